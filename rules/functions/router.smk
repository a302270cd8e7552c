# router: the pipeline's config slice, results layout and input functions, used by rules/router.smk
# (functions apart from rules, as snakemake --lint asks).

ROUTER = config["router"]


def router_path(*parts):
    return results("router", ROUTER["run"], *parts)


def router_targets():
    """The router's evaluation (metrics, curve; none with router.split.test 0) and calibration."""
    evaluation = [router_path("eval", "metrics.json"), router_path("eval", "curve.png")]
    return [*(evaluation if ROUTER["split"]["test"] > 0 else []), router_path("route", "calibration.json")]

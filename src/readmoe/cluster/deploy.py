"""The Ray Serve application: one ingress, N engine replicas, the chosen request router.

`application(args)` is a Serve application builder, so the same code runs from
`readmoe serve --replicas N` (a local Ray, or the cluster in RAY_ADDRESS) and from
`serve deploy` with the YAML that `readmoe serve --emit-config` writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from .affinity import ROUTES

APP_NAME = "readmoe"


@dataclass
class ClusterArgs:
    """Everything the deployment needs, as plain data (the YAML's `args`)."""

    model: str
    replicas: int = 2
    route: str = "affinity"
    served_model_name: str = "readmoe"
    api_key: str | None = None
    engine: dict = field(default_factory=dict)  # EngineConfig fields
    dtype: str = "auto"
    max_queued: int = 64
    threads: int = 0  # torch threads per replica; 0: num_cpus (at least 1)
    num_cpus: float = 1.0  # Ray resources per engine replica
    num_gpus: float = 0.0
    affinity_bound: int = 2  # affinity picks among replicas within this many requests of the least-loaded one
    stats_period_s: float = 0.5  # how often replicas report their resident experts and queue

    def check(self) -> "ClusterArgs":
        if self.replicas < 1:
            raise UserError("`replicas` must be >= 1")
        if self.route not in ROUTES:
            raise UserError(f"unknown `route` '{self.route}': use {', '.join(ROUTES)}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.threads < 0:
            raise UserError("`num_cpus`, `num_gpus` and `threads` must be >= 0")
        if self.affinity_bound < 0:
            raise UserError("`affinity_bound` must be >= 0")
        if not (Path(self.model).expanduser() / "config.json").is_file():
            raise UserError(f"no readmoe checkpoint at '{self.model}' (`model`)")
        return self


def application(args: dict):
    """Serve application builder (`import_path: readmoe.cluster.deploy:application`)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .ingress import Ingress
    from .replica import EngineReplica
    from .routers import ROUTER_CLASSES

    a = ClusterArgs(**args).check()
    from ..modeling import ReadMEConfig

    num_experts = ReadMEConfig.from_pretrained(str(Path(a.model).expanduser())).num_experts
    max_running = a.engine.get("max_running", 16)
    router = RequestRouterConfig(request_router_class=ROUTER_CLASSES[a.route],
                                 request_router_kwargs={"num_experts": num_experts, "bound": a.affinity_bound},
                                 request_routing_stats_period_s=a.stats_period_s, request_routing_stats_timeout_s=5.0)
    engines = serve.deployment(EngineReplica, name="EngineReplica", num_replicas=a.replicas,
                               ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
                               max_ongoing_requests=max_running + a.max_queued,
                               max_queued_requests=a.max_queued * a.replicas,
                               request_router_config=router, health_check_period_s=2.0, health_check_timeout_s=30.0,
                               graceful_shutdown_timeout_s=5.0)
    threads = a.threads or max(1, int(a.num_cpus))
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    return ingress.bind(engines.bind(a.model, a.engine, a.dtype, a.max_queued, threads), a.model,
                        a.served_model_name, a.api_key, a.route)


def config_yaml(args: ClusterArgs, host: str, port: int) -> str:
    """A `serve deploy` config for a running Ray cluster (see docs/scale-out.md)."""
    import yaml

    d = asdict(args)
    d["model"] = str(Path(args.model).expanduser().resolve())
    if d["api_key"] is None:
        del d["api_key"]
    cfg = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
           "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "readmoe.cluster.deploy:application",
                             "args": d}]}
    return yaml.safe_dump(cfg, sort_keys=False)


def run(args: ClusterArgs, host: str, port: int, on_ready=None) -> None:
    """Deploy on the Ray cluster in RAY_ADDRESS, or on a local one started here, and serve until SIGINT/SIGTERM;
    then tear down what this call started."""
    import os
    import signal
    import threading

    import ray
    from ray import serve

    args.check()
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(asdict(args)), name=APP_NAME, route_prefix="/")
        if on_ready is not None:
            on_ready()
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.delete(APP_NAME) if not local else serve.shutdown()
        finally:
            ray.shutdown()

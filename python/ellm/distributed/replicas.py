"""Data parallel serving: N engine replicas, each with its own model and KV slots, behind one
OpenAI-compatible endpoint on Ray Serve. Ray Serve's proxy spreads the requests over the replicas;
each replica is ellm's own FastAPI app (`ellm.serving.server.create_app`), so every route, the
streaming and the errors are the same as `ellm serve` on one machine."""

from __future__ import annotations

import os
import socket
from typing import Any

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(f"ellm serve --replicas runs on Ray Serve: pip install 'ellm[ray]' ({exc})") from None

from ..serving.server import create_app, serving_loader


@serve.ingress()
class EllmReplica:
    """One replica: loads the model in its own process and serves ellm's app."""

    def __init__(self, model_path: str | None, options: dict[str, Any], api_key: str | None,
                 threads: int | None) -> None:
        if threads:
            os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the engine's pool starts
        self.name = f"ellm-0.1.0-{socket.gethostname()}-{os.getpid()}"
        # loaded before the constructor returns: Ray Serve routes to a replica only once it is ready
        serving = serving_loader(model_path, fingerprint=self.name, **options)()
        self._ellm_app = create_app(serving, api_key=api_key)

    def __serve_build_asgi_app__(self):
        return self._ellm_app


def replica_application(model_path: str | None, *, replicas: int, slots: int = 4, max_seq_len: int = 2048,
                        dtype: str = "auto", max_queue: int = 64, api_key: str | None = None,
                        threads_per_replica: int | None = None):
    """The Ray Serve application: `replicas` copies of the engine behind one endpoint."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    options = {"slots": slots, "max_seq_len": max_seq_len, "dtype": dtype, "max_queue": max_queue}
    deployment = serve.deployment(EllmReplica, name="ellm").options(
        num_replicas=replicas, max_ongoing_requests=slots + max_queue,
        ray_actor_options={"num_cpus": threads_per_replica or 1})
    return deployment.bind(model_path, options, api_key, threads_per_replica)


def serve_replicas(model_path: str | None, *, replicas: int, host: str = "127.0.0.1", port: int = 8000,
                   ray_address: str | None = None, blocking: bool = True, **options: Any) -> None:
    """Start Ray (or join `ray_address`), Ray Serve on host:port, and the replicas; with blocking,
    serve until interrupted."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address)
    serve.start(http_options={"host": host, "port": port})
    application = replica_application(model_path, replicas=replicas, **options)
    if not blocking:
        serve.run(application, name="ellm", route_prefix="/")
        return
    try:
        serve.run(application, name="ellm", route_prefix="/", blocking=True)
    finally:  # Serve's actors outlive this process otherwise (its controller is detached)
        serve.shutdown()

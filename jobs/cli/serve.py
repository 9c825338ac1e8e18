"""`gemma-unified serve`: run the endpoint on this machine (a local Ray instance) or on a cluster (--address)."""

from __future__ import annotations

from pathlib import Path

import typer


def serve_command(
    config: Path | None = typer.Argument(None, help="A serve YAML (ServeSpec); flags override its fields."),
    model: str | None = typer.Option(None, help="tiny, gemma-4-12b-it, a directory, an HF id or an s3:// URL."),
    port: int | None = typer.Option(None, help="HTTP port (default 8000)."),
    host: str | None = typer.Option(None, help="Address to bind (default 0.0.0.0)."),
    engine: str | None = typer.Option(None, help="transformers or vllm."),
    speculative: bool | None = typer.Option(
        None, "--speculative/--no-speculative", help="engine.speculative on / off (unset: the file's, default auto)."
    ),
    address: str | None = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local one)."),
    proxy: str | None = typer.Option(None, help="serve (Ray Serve's HTTP proxy) or haproxy (experimental)."),
    num_cpus: int | None = typer.Option(None, help="CPUs of a local Ray instance (default: all)."),
) -> None:
    """Serve the OpenAI-compatible endpoint (chat, transcriptions, translations) until interrupted."""
    import os
    import signal
    import time

    from pipelines.errors import GemmaUnifiedError, ModelSourceError
    from pipelines.preflight import check_local_model
    from serving.spec import load_spec

    overrides = {
        "model": {"name": model},
        "engine": {"kind": engine, "speculative": speculative},
        "http": {"port": port, "host": host, "proxy": proxy},
    }
    try:
        spec = load_spec(config, overrides)
    except GemmaUnifiedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2)

    from ray import serve

    from serving.app import connect, start

    on_cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    if on_cluster and spec.http.proxy == "haproxy":
        typer.echo(
            "note: http.proxy=haproxy takes effect only where the cluster's nodes started with "
            "RAY_SERVE_ENABLE_DIRECT_INGRESS=1, RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
            "(and the haproxy binary)",
            err=True,
        )
    if not on_cluster:  # here the model and the engine's extra must be on this machine: say so before Ray starts
        check_local_model(spec.model, spec.engine)
    connect(spec, address, num_cpus=num_cpus)
    start(spec)
    load_error = _model_load_error(spec)
    if load_error:
        serve.delete(spec.app_name)
        if not on_cluster:
            serve.shutdown()
        raise ModelSourceError(load_error)
    shown_host = "127.0.0.1" if spec.http.host in ("0.0.0.0", "::") else spec.http.host
    base = f"http://{shown_host}:{spec.http.port}{spec.route_prefix.rstrip('/')}"
    typer.echo(f"Serving {spec.model_id!r} at {base}/v1 (readiness: {base}/health/ready). Ctrl-C stops it.")
    signal.signal(signal.SIGTERM, _interrupt)  # a process manager's stop cleans up like Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(spec.app_name)
        if not on_cluster:
            serve.shutdown()


def _model_load_error(spec) -> str | None:
    """Waits for a model replica's model to load; what it reports when it could not (the replica stays up to say
    it). Replicas load in the background, so Serve has the app running before the model is ready."""
    import time

    from ray import serve

    from serving.app import MODEL_NAME

    handle = serve.get_deployment_handle(MODEL_NAME, spec.app_name)
    said = False
    while True:
        info = handle.ready.remote().result(timeout_s=120)
        if not info.get("loading"):
            return info.get("error")
        if not said:
            typer.echo(f"Loading the model {spec.model_id!r} ...", err=True)
            said = True
        time.sleep(1.0)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt

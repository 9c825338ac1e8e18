"""`gemma-unified render-k8s`: the cluster manifests of a serve file, job files and a schedules file.

Exit codes: 0 rendered, 2 a spec is invalid or cannot become a manifest (credentials inline, a replica too big).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipelines.errors import GemmaUnifiedError


def render_files(
    serve_file: Path | None,
    job_files: list[Path],
    schedules_file: Path | None,
    cluster_file: Path | None,
    *,
    image: str | None = None,
    gpu_image: str | None = None,
) -> dict[str, str]:
    """Relative path -> file text: k8s/ for KubeRay and the scheduler, vm/ for Ray's cluster launcher."""
    from jobs.deploy.cluster import RenderError, load_cluster
    from jobs.deploy.files import render
    from jobs.job_files import load_job
    from jobs.schedules import load_schedules
    from serving.spec import load_spec

    if not (serve_file or job_files or schedules_file):
        raise RenderError("nothing to render: give a serve file, --job or --schedules")
    cluster = load_cluster(cluster_file)
    overrides = {k: v for k, v in {"image": image, "gpu_image": gpu_image}.items() if v}
    cluster = cluster.model_copy(update=overrides)
    sources = [p for p in [serve_file, *job_files, schedules_file, cluster_file] if p]
    serve = load_spec(serve_file) if serve_file else None
    stems = [p.stem for p in job_files]
    if len(set(stems)) < len(stems):
        raise RenderError(f"job files need distinct names: they name the RayJobs ({', '.join(stems)})")
    jobs = {path.stem: load_job(path) for path in job_files}
    schedule_file = load_schedules(schedules_file, check_clusters=False) if schedules_file else None
    return render(serve, jobs, schedule_file, cluster, sources)


def render_k8s(
    serve_file: Path | None = typer.Argument(None, help="A serve YAML (ServeSpec): RayService and Serve config."),
    job: list[Path] | None = typer.Option(None, "--job", help="A job YAML (JobSpec): one RayJob each (repeatable)."),
    schedules: Path | None = typer.Option(None, help="A schedules YAML: a batch RayCluster and the scheduler CronJob."),
    cluster: Path | None = typer.Option(
        None, help="A cluster YAML (ClusterSpec): images, pod sizes, model cache, VM types."
    ),
    image: str | None = typer.Option(None, help="CPU image; overrides the cluster file."),
    gpu_image: str | None = typer.Option(None, help="GPU image; overrides the cluster file."),
    out: Path | None = typer.Option(
        None, help="Write k8s/ and vm/ under this folder (default: print the Kubernetes manifests)."
    ),
) -> None:
    """Render KubeRay manifests, the scheduler CronJob and a VM cluster config from the project's own specs."""
    try:
        files = render_files(serve_file, list(job or []), schedules, cluster, image=image, gpu_image=gpu_image)
    except GemmaUnifiedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2)
    if out is None:
        applied = [text for path, text in files.items() if path.startswith("k8s/") and "/templates/" not in path]
        typer.echo("".join(applied), nl=False)
        return
    for relative, text in files.items():
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        typer.echo(str(target))

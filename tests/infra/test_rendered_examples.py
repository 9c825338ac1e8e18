"""infra/k8s and infra/vm are exactly what the example specs render to today: a spec default or a renderer change
that alters them fails here until they are rendered again."""

from __future__ import annotations

from infra_paths import RENDER_COMMAND, REPO

GENERATED = ("k8s", "vm")


def test_committed_manifests_match_a_fresh_render(rendered):
    infra = REPO / "infra"
    stale = [
        path for path, text in rendered.items() if not (infra / path).is_file() or (infra / path).read_text() != text
    ]
    on_disk = {str(p.relative_to(infra)) for folder in GENERATED for p in (infra / folder).rglob("*") if p.is_file()}
    leftovers = sorted(on_disk - set(rendered))
    assert not stale and not leftovers, (
        f"out of date: {stale}; no longer rendered: {leftovers}. From the repository root run: {RENDER_COMMAND}"
        + (" and delete the leftovers" if leftovers else "")
    )

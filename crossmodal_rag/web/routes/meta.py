"""``/api/health`` (answered on the event loop, never behind a worker) and ``/api/stats``."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..._version import __version__
from ..models import HealthOut, StatsOut
from ..settings import WebSettings
from ..state import AppState, get_state

__all__ = ["router"]


def router(settings: WebSettings) -> APIRouter:
    r = APIRouter(tags=["meta"])

    @r.get("/api/health", response_model=HealthOut)
    async def health(st: AppState = Depends(get_state)) -> HealthOut:  # on the loop: never waits for a worker
        return HealthOut(status="ok", version=__version__, encoder=st.paths.spec(st.collection.manifest.encoder),
                         generator=st.paths.spec(st.generator.spec), generator_status=st.generator_status)

    @r.get("/api/stats", response_model=StatsOut)
    def stats(st: AppState = Depends(get_state)) -> StatsOut:
        c, paths = st.collection, st.paths
        m = c.manifest
        counts, missing = st.backend.counts()  # several shards: summed over those that answer
        shards = {"shards": list(st.backend.shards), "missing_shards": [{"shard": s, "reason": why}
                                                                        for s, why in missing.items()]}
        return StatsOut(collection=st.backend.name if st.backend.shards else paths.folder(c.folder),
                        encoder=paths.spec(m.encoder), dim=m.dim, index_type=m.index_type, counts=counts,
                        generation=m.generation, updated_at=m.updated_at,
                        captures=c.store.capture_summary(top=30) or None,  # the page's date and place facets
                        **(shards if st.backend.shards else {}))

    return r

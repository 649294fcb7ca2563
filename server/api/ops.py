"""Operations: ``GET /health`` (liveness), ``GET /ready`` (readiness), ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from server.api.deps import State

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(state: State) -> JSONResponse:
    """200 while the engine loop runs (or the server is still starting); 503 once the loop has died."""
    engine = state.engine
    if engine is not None and not engine.alive:
        return JSONResponse({"status": "dead", "error": repr(engine.error)}, status_code=503)
    return JSONResponse({"status": "ok" if engine is not None else "starting"})


@router.get("/ready")
async def ready(state: State) -> JSONResponse:
    """200 once the model is loaded, the engine runs and the first prompt scan is done, until a shutdown starts
    draining; else 503."""
    ok = bool(state.ready and not state.draining and state.engine is not None and state.engine.alive)
    body = {
        "ready": ok,
        "draining": state.draining,
        "model": state.loaded.model_id if state.loaded else None,
        "prompts": len(state.registry),
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """Prometheus text exposition."""
    return Response(state.metrics.render(), media_type=state.metrics.content_type)

"""The HTTP API (FastAPI): predictions, labels and labelled instances in; status, history, metrics out.

``create_app(service)`` builds the app for one running :class:`service.runtime.Service`; there is no
module-level state. Routes (DESIGN.md's HTTP contract):

====================================  ==========================================================
``POST /v1/models/{name}/predict``    micro-batched scoring on the published model snapshot
``POST /v1/models/{name}/labels``     labels for earlier events → the model's labels topic
``POST /v1/models/{name}/learn``      labelled instances → the model's events topic
``GET  /v1/models[/{name}]``          status JSON; ``/v1/models/{name}/history`` for the status page
``GET  /healthz`` ``/readyz``         liveness; readiness (the runtime is consuming)
``GET  /metrics``                     Prometheus text format
``GET  /`` ``/static/*`` ``/docs``    status page, its assets, OpenAPI
====================================  ==========================================================

Labels and learn go through Kafka, not around it: the route produces the messages to the model's
topics and answers ``202`` only once the broker has acknowledged every one of them. The model's
single writer then consumes them exactly like any other producer's, so HTTP labels are joined,
scored, learned, checkpointed and replayed after a crash by the same at-least-once path.
A message carries ``"model": name`` so that it reaches this model even on a shared topic.

Bodies are parsed and checked in one pass (pydantic's JSON mode plus a scalar check of every
feature value) instead of FastAPI's body parameters, which decode JSON in Python first; the
pydantic models still describe every body in the OpenAPI schema. Bad input is a ``400`` (not JSON)
or ``422`` whose ``detail`` lists ``{"loc", "msg", "type"}`` with the failing field's path;
a body over ``http.max_body_bytes`` is a ``413`` whether it declares its length or streams it.
A configured ``http.token`` is required as ``Authorization: Bearer …`` on the mutating routes
(labels, learn); predict and the read-only routes stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.resources
import math
import secrets
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import fastapi.responses
import orjson
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError
from starlette.requests import ClientDisconnect

from learners.protocol import ModelUnavailable, RowsRejected
from service.batching import MicroBatcher
from service.codec import check_label, json_type_name, label_kind

STATIC_DIR = Path(__file__).parent / "static"

_MAX_FLOAT = 1.7976931348623157e308
_MIN_INT, _MAX_INT = -(2**63), 2**63 - 1  # what Kafka messages (orjson) can carry
_ACK_TIMEOUT_S = 30.0
# Class labels may be ints or bools (non-string keys of `proba`); learners may hand back numpy scalars.
_JSON_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _number_ok(value: Any) -> bool:
    """A finite float, or an integer within 64 bits."""
    if type(value) is float:
        return -_MAX_FLOAT <= value <= _MAX_FLOAT
    return type(value) is int and _MIN_INT <= value <= _MAX_INT


def _describe(value: Any) -> str:
    if type(value) is float:
        return f"the number {value!r}" if math.isfinite(value) else "a non-finite number"
    if type(value) is int:
        return "an integer beyond 64 bits"
    return json_type_name(value)


# ---------------------------------------------------------------------------------------------
# Bodies. Ids and labels are checked by small validators rather than unions, so an error names the
# field once, with one message, instead of once per union member.

def _check_id(value: Any) -> str | int:
    if (type(value) is str and value) or (type(value) is int and _number_ok(value)):
        return value
    got = "an empty string" if value == "" else _describe(value)
    raise PydanticCustomError("id_type", "expected a non-empty string or a 64-bit integer, got {got}", {"got": got})


def _check_optional_id(value: Any) -> str | int | None:
    return None if value is None else _check_id(value)


def _check_label(value: Any) -> str | int | float | bool:
    if type(value) is str or type(value) is bool or _number_ok(value):
        return value
    raise PydanticCustomError("label_type", "expected a string, finite number or boolean, got {got}",
                              {"got": _describe(value)})


_SCALAR_SCHEMA = {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}, {"type": "null"}]}
_ID_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer"}]}
_LABEL_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}

EventId = Annotated[Any, AfterValidator(_check_id), WithJsonSchema(_ID_SCHEMA)]
OptionalEventId = Annotated[Any, AfterValidator(_check_optional_id), WithJsonSchema(
    {"anyOf": [*_ID_SCHEMA["anyOf"], {"type": "null"}]})]
LabelValue = Annotated[Any, AfterValidator(_check_label), WithJsonSchema(_LABEL_SCHEMA)]
# Feature values are checked by `_feature_errors` after the structure, so the error names the key.
Features = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "additionalProperties": _SCALAR_SCHEMA})]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Instance(_Body):
    id: OptionalEventId = Field(None, description="echoed back with its prediction")
    features: Features


class PredictRequest(_Body):
    instances: list[Instance] = Field(min_length=1)


class Prediction(_Body):
    id: str | int | None
    label: Any = Field(description="the predicted class (classifier) or value (regressor)")
    proba: dict[str, float] | None = Field(description="class probabilities; null for a regressor")


class PredictResponse(_Body):
    model_version: int
    predictions: list[Prediction]


class LabelItem(_Body):
    id: EventId
    label: LabelValue


class LabelsRequest(_Body):
    labels: list[LabelItem] = Field(min_length=1)


class LearnInstance(_Body):
    id: OptionalEventId = Field(None, description="event id; a UUID is assigned when absent")
    features: Features
    label: LabelValue
    # strict: a JSON number, as the Kafka decoder takes it (lax mode turned "123" and true into numbers)
    ts: float | None = Field(None, allow_inf_nan=False, strict=True,
                             description="event time, seconds since the epoch")


class LearnRequest(_Body):
    instances: list[LearnInstance] = Field(min_length=1)


class Accepted(_Body):
    accepted: int
    topic: str
    ids: list[str]


_REQUEST_BODIES = (PredictRequest, LabelsRequest, LearnRequest)
_RESPONSE_BODIES = (PredictResponse, Accepted)


class JSONResponse(fastapi.responses.JSONResponse):
    """orjson-rendered JSON (class labels as keys become strings). A JSON response to FastAPI,
    so that the OpenAPI schema documents the bodies (a plain Response made them strings)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_JSON_OPTS)


def _unprocessable(errors: list[dict[str, Any]]) -> HTTPException:
    return HTTPException(422, errors)


def _feature_errors(instances: list[Any], field: str) -> list[dict[str, Any]]:
    """Feature values must be finite numbers, strings, booleans or null (the event contract).

    The hot path of every predict: one inlined pass (a function call per value would cost more
    than the check). JSON parsing already limits values to JSON types; ``x - x != 0`` only for
    ±inf (``1e999`` parses as inf).
    """
    errors = []
    for i, instance in enumerate(instances):
        for key, value in instance.features.items():
            kind = type(value)
            if kind is float:
                if value - value == 0.0:
                    continue
            elif kind is str or value is None or kind is bool or (kind is int and _MIN_INT <= value <= _MAX_INT):
                continue
            errors.append({"loc": ["body", field, i, "features", key], "type": "feature_value",
                           "msg": f"{field}[{i}].features.{key}: expected a finite number, string, "
                                  f"boolean or null, got {_describe(value)}"})
            if len(errors) >= 20:
                return errors
    return errors


def _label_errors(runtime: Any, field: str, items: list[Any]) -> list[dict[str, Any]]:
    """Labels the body schema accepts may still not suit the model: a regressor needs numbers, a
    classifier labels of one kind (the model's, else the body's first)."""
    errors = []
    kind = label_kind(runtime.label_kind, (item.label for item in items)) if runtime.task == "classification" else None
    for i, item in enumerate(items):
        invalid = check_label(item.label, runtime.task, kind)
        if invalid is not None:
            errors.append({"loc": ["body", field, i, "label"], "type": invalid.reason,
                           "msg": f"{field}[{i}].{invalid.detail}"})
            if len(errors) >= 20:
                break
    return errors


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    """Validate ``raw`` against ``model``; 400 when it is not JSON, 422 naming each bad field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise HTTPException(400, [{"loc": ["body"], "type": "json_invalid",
                                       "msg": f"body: not valid JSON: {errors[0]['msg']}"}]) from None
        detail = []
        for e in errors[:20]:
            path = "".join(f"[{p}]" if type(p) is int else f".{p}" for p in e["loc"]).lstrip(".")
            detail.append({"loc": ["body", *e["loc"]], "type": e["type"],
                           "msg": f"{path or 'body'}: {e['msg']}"})
        raise _unprocessable(detail) from None


# ---------------------------------------------------------------------------------------------
# Dependencies: the app's service lives in ``app.state``; nothing is global. They are ``async``
# because they never block: FastAPI would run a plain ``def`` in a worker thread, one thread hop
# per dependency per request.

async def get_service(request: Request) -> Any:
    return request.app.state.service


ServiceDep = Annotated[Any, Depends(get_service)]


async def get_runtime(name: str, service: ServiceDep) -> Any:
    runtime = service.models.get(name)
    if runtime is None:
        raise HTTPException(404, f"model {name!r} not found; configured models: {sorted(service.models)}")
    return runtime


async def require_started(service: ServiceDep) -> None:
    """Predictions, labels and learning wait for the start: until the checkpoint is restored and
    Kafka is connected there is no model to predict with and no producer to write with."""
    if not service.ready:
        state = "stopped" if service.error is not None else "is starting (restoring its checkpoint, connecting to Kafka)"
        raise HTTPException(503, f"the service {state}; see /readyz", headers={"Retry-After": "5"})


async def require_token(request: Request, service: ServiceDep) -> None:
    """``Authorization: Bearer <http.token>`` when a token is configured."""
    expected = service.settings.http.token
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise HTTPException(401, "authorization: a valid 'Bearer <token>' is required for this route",
                            headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, service: ServiceDep) -> bytes:
    timeout = service.settings.http.body_timeout_seconds
    try:
        # bounded: a client that never finishes its body would hold its connection for ever
        return await asyncio.wait_for(request.body(), timeout)
    except ClientDisconnect:  # gone mid-body: nobody to answer, and nothing to log a traceback for
        raise HTTPException(400, "body: the client disconnected before sending all of it") from None
    except TimeoutError:
        raise HTTPException(408, f"body: not received within {timeout:g} s (http.body_timeout_seconds)") from None


RuntimeDep = Annotated[Any, Depends(get_runtime)]
RawBody = Annotated[bytes, Depends(read_body)]


# ---------------------------------------------------------------------------------------------

def _openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _install_openapi(app: FastAPI) -> None:
    """FastAPI's schema plus the request bodies the routes parse themselves."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            _, defs = models_json_schema([(m, "validation") for m in (*_REQUEST_BODIES, *_RESPONSE_BODIES)],
                                         ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(defs["$defs"])
            # the token the mutating routes take (require_token), so that the docs page can send it
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for route in ("labels", "learn"):
                schema["paths"][f"/v1/models/{{name}}/{route}"]["post"]["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _render_predictions(ids: list[Any], scored) -> bytes:
    labels, probas = scored.labels, scored.probas
    if probas is None:
        predictions = [{"id": i, "label": y, "proba": None} for i, y in zip(ids, labels, strict=True)]
    else:
        predictions = [{"id": i, "label": y, "proba": p} for i, y, p in zip(ids, labels, probas, strict=True)]
    return orjson.dumps({"model_version": scored.model_version, "predictions": predictions}, option=_JSON_OPTS)


def create_app(service) -> FastAPI:
    """The FastAPI app serving ``service`` (a :class:`service.runtime.Service`)."""
    http = service.settings.http
    batchers = {
        name: MicroBatcher(runtime.snapshot, max_batch=http.max_batch_size,
                           max_wait_s=http.max_batch_wait_ms / 1000.0,
                           observe=service.metrics.predict_observer(name), name=name)
        for name, runtime in service.models.items()
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # The long-lived heap (modules, schemas, the model: ~400k objects) leaves the cyclic
        # collector's generations: otherwise every full collection triggered by request garbage
        # walks all of it, a stall of a second on a busy 2-core machine. Measured on 1000-instance
        # predicts under load: 27.6 -> 16.4 ms CPU per request, p99 917 -> 104 ms.
        gc.collect()
        gc.freeze()
        yield
        for batcher in batchers.values():
            batcher.close()

    app = FastAPI(title="streamlearn", version="1", lifespan=lifespan, default_response_class=JSONResponse,
                  docs_url=None, redoc_url=None,  # /docs below, from assets served here (offline too)
                  max_body_size=http.max_body_bytes,
                  description="Online learning from event streams: predictions, labels, status, metrics.")
    app.state.service = service
    _install_openapi(app)

    async def send_all(topic: str, messages: list[dict[str, Any]]) -> None:
        """Produce ``messages`` and wait for the broker's acknowledgement of every one."""
        futures = [service.producer_send(topic, m) for m in messages]
        try:
            await asyncio.to_thread(lambda: [f.get(timeout=_ACK_TIMEOUT_S) for f in futures])
        except Exception as exc:  # some may have been written: a retry is at-least-once, like Kafka's
            raise HTTPException(503, f"kafka: could not write to topic {topic!r}: {exc}; retry") from exc

    # -- model routes -----------------------------------------------------------------------
    @app.post("/v1/models/{name}/predict", tags=["models"], openapi_extra=_openapi_body(PredictRequest),
              dependencies=[Depends(require_started)],
              responses={200: {"model": PredictResponse}, 404: {}, 413: {}, 422: {}, 503: {}})
    async def predict(runtime: RuntimeDep, raw: RawBody) -> Response:
        """Score instances on the model's current published snapshot (micro-batched); 503 while
        the service starts, or while the model cannot predict at all (its weights diverged)."""
        body = _parse(PredictRequest, raw)
        errors = _feature_errors(body.instances, "instances")
        if errors:
            raise _unprocessable(errors)
        try:
            scored = await batchers[runtime.name].predict([inst.features for inst in body.instances])
        except RowsRejected as exc:  # valid JSON the model cannot take (a River model and a text value)
            raise _unprocessable([{"loc": ["body", "instances", i, "features"], "type": "model_error",
                                   "msg": f"instances[{i}].features: the model cannot score them: {reason}"}
                                  for i, reason in list(exc.rows.items())[:20]]) from exc
        except ModelUnavailable as exc:  # no instance is at fault: the model is
            raise HTTPException(503, f"model {runtime.name!r} cannot predict: {exc}") from exc
        return Response(_render_predictions([inst.id for inst in body.instances], scored),
                        media_type="application/json")

    @app.post("/v1/models/{name}/labels", tags=["models"], status_code=202,
              dependencies=[Depends(require_token), Depends(require_started)], openapi_extra=_openapi_body(LabelsRequest),
              responses={202: {"model": Accepted}, 401: {}, 404: {}, 413: {}, 422: {}, 503: {}})
    async def labels(runtime: RuntimeDep, raw: RawBody) -> JSONResponse:
        """Labels of earlier events: joined with the stored predictions, scored, then learned."""
        body = _parse(LabelsRequest, raw)
        errors = _label_errors(runtime, "labels", body.labels)
        if errors:
            raise _unprocessable(errors)
        topic = runtime.config.topics.labels
        ids = [str(item.id) for item in body.labels]
        await send_all(topic, [{"id": i, "label": item.label, "model": runtime.name}
                               for i, item in zip(ids, body.labels, strict=True)])
        return JSONResponse({"accepted": len(ids), "topic": topic, "ids": ids}, status_code=202)

    @app.post("/v1/models/{name}/learn", tags=["models"], status_code=202,
              dependencies=[Depends(require_token), Depends(require_started)], openapi_extra=_openapi_body(LearnRequest),
              responses={202: {"model": Accepted}, 401: {}, 404: {}, 413: {}, 422: {}, 503: {}})
    async def learn(runtime: RuntimeDep, raw: RawBody) -> JSONResponse:
        """Labelled instances: predicted first, then learned (prequential), like any event."""
        body = _parse(LearnRequest, raw)
        errors = _feature_errors(body.instances, "instances") + _label_errors(runtime, "instances",
                                                                              body.instances)
        if errors:
            raise _unprocessable(errors)
        topic = runtime.config.topics.events
        now = time.time()
        ids = [str(inst.id) if inst.id is not None else uuid.uuid4().hex for inst in body.instances]
        await send_all(topic, [{"id": i, "features": inst.features, "label": inst.label,
                                "ts": now if inst.ts is None else inst.ts, "model": runtime.name}
                               for i, inst in zip(ids, body.instances, strict=True)])
        return JSONResponse({"accepted": len(ids), "topic": topic, "ids": ids}, status_code=202)

    @app.get("/v1/models", tags=["models"])
    async def list_models() -> JSONResponse:
        """Status of every configured model."""
        return JSONResponse({"models": [runtime.status() for runtime in service.models.values()]})

    @app.get("/v1/models/{name}", tags=["models"], responses={404: {}})
    async def model_status(runtime: RuntimeDep) -> JSONResponse:
        """Status JSON: events, prequential and estimated metrics, drift, learning rate, checkpoint."""
        return JSONResponse(runtime.status())

    @app.get("/v1/models/{name}/history", tags=["models"], responses={404: {}})
    async def model_history(runtime: RuntimeDep, since: float | None = None) -> JSONResponse:
        """Recent per-second points (with ``since``: only those after that time, which is how the
        status page polls) and drift events (the status page's charts)."""
        return JSONResponse(runtime.history(since))

    # -- operations -------------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        """The process serves HTTP."""
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["ops"], responses={503: {}})
    async def readyz() -> JSONResponse:
        """Ready once the service has started (checkpoint restored, Kafka connected, loop running);
        503 while it starts, and once its loop has stopped."""
        ready = bool(service.ready)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics() -> Response:
        """Prometheus text exposition format."""
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise HTTPException(404, "status page not installed (service/static/index.html)")
        return FileResponse(page)

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        """Swagger UI on the API, its scripts served by the service: FastAPI's default loads them
        from a CDN, so the page stayed blank where the service cannot reach the internet."""
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="streamlearn API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon.png")

    # Swagger UI 5 (OpenAPI 3.1, which FastAPI writes), as fastapi-offline packages it
    app.mount("/docs/assets", StaticFiles(directory=importlib.resources.files("fastapi_offline") / "static"),
              name="docs-assets")
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


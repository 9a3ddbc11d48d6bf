"""The HTTP API against a real service: real broker, real uvicorn server, real HTTP on loopback.

One service (three models on topics of their own: the default classifier, a regressor, and River's
logistic regression without preprocessing, which cannot take text values) serves every test of
this module; each test works on ids and models it does not share with the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
import uuid

import httpx
import orjson
import pytest
import uvicorn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from service.broker import free_port
from service.config import load_settings
from service.http import STATIC_DIR, create_app
from service.runtime import Service

pytestmark = pytest.mark.broker

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MAX_BODY = 64 * 1024


@contextlib.contextmanager
def serving(service: Service):
    """``service`` behind a real uvicorn server on a free loopback port; yields an httpx client."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


def topics(prefix: str) -> dict[str, str]:
    return {"events": f"{prefix}.events", "labels": f"{prefix}.labels", "predictions": f"{prefix}.predictions",
            "dead_letter": f"{prefix}.dead-letter"}


@pytest.fixture(scope="module")
def svc(broker, tmp_path_factory):
    run = uuid.uuid4().hex[:8]
    cfg = load_settings(overrides={
        "state_dir": str(tmp_path_factory.mktemp("http-state")),
        "kafka": {"bootstrap": broker},
        "http": {"token": TOKEN, "max_body_bytes": MAX_BODY},
        "checkpoint": {"interval_seconds": 2},
        "publish_interval_seconds": 0.05,
        "models": {
            "default": {"topics": topics(f"http-{run}"), "prequential_window": 100_000},
            "reg": {"task": "regression", "topics": topics(f"http-{run}-reg")},
            "linear": {"topics": topics(f"http-{run}-linear"), "learner": {
                "learner": "river", "estimator": "linear_model.LogisticRegression", "preprocess": False}},
            # made to diverge by test_a_diverged_model_is_a_503_saying_so_and_the_others_serve_on
            "fragile": {"topics": topics(f"http-{run}-fragile"), "learner": {"hidden": 8}},
        },
    })
    service = Service(cfg).start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def client(svc):
    with serving(svc) as c:
        yield c


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def status(client, name="default") -> dict:
    r = client.get(f"/v1/models/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def learned(client, name="default") -> int:
    return status(client, name)["events"]["learned"]


def assert_names(response, status_code: int, *fragments: str):
    """A 4xx whose detail says which field failed."""
    assert response.status_code == status_code, response.text
    text = json.dumps(response.json()["detail"])
    for fragment in fragments:
        assert fragment in text, (fragment, text)


# -- predict ------------------------------------------------------------------------------------

def test_predict_answers_every_instance_in_order(client):
    body = {"instances": [{"id": "a", "features": {"x": 1.0, "colour": "red", "ok": True, "gap": None}},
                          {"features": {"x": -2}},
                          {"id": 7, "features": {}}]}
    r = client.post("/v1/models/default/predict", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["model_version"], int)
    assert [p["id"] for p in out["predictions"]] == ["a", None, 7]
    for p in out["predictions"]:
        assert set(p) == {"id", "label", "proba"}
        if p["proba"]:  # a classifier that has seen classes: label = the most probable class
            assert abs(sum(p["proba"].values()) - 1.0) < 1e-6
            assert json.dumps(p["label"]).strip('"') == max(p["proba"], key=p["proba"].get)


def test_learn_is_prequential_and_moves_predictions(client, svc):
    before = status(client)
    xs = [(-1) ** i * (1 + (i % 7) / 3) for i in range(600)]
    body = {"instances": [{"id": f"learn-{i}", "features": {"x": x}, "label": int(x > 0)}
                          for i, x in enumerate(xs)]}
    r = client.post("/v1/models/default/learn", json=body, headers=AUTH)
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == 600 and r.json()["ids"][:2] == ["learn-0", "learn-1"]
    wait_for(lambda: learned(client) >= before["events"]["learned"] + 600, what="600 events learned")
    after = status(client)
    # Predicted first, then learned: both counts move by the same amount.
    assert after["events"]["predicted"] - before["events"]["predicted"] == 600
    assert after["prequential"]["n"] >= 600 and after["prequential"]["accuracy"] is not None

    def served():
        return client.post("/v1/models/default/predict", json={
            "instances": [{"id": "p", "features": {"x": 3.0}}, {"id": "n", "features": {"x": -3.0}}]}).json()

    # The learner publishes a new snapshot within `publish_interval_seconds` of learning.
    out = wait_for(lambda: (o := served())["model_version"] > before["model_version"]
                   and [p["label"] for p in o["predictions"]] == [1, 0] and o,
                   what="the published snapshot to separate the classes")
    assert [p["id"] for p in out["predictions"]] == ["p", "n"]
    assert set(out["predictions"][0]["proba"]) == {"0", "1"}  # the labels as learned (JSON keys are strings)


def test_labels_post_joins_pending_predictions_and_learns(client, svc, broker):
    events_topic = svc.settings.models["default"].topics.events
    before = status(client)
    ids = [f"late-{uuid.uuid4().hex[:6]}-{i}" for i in range(50)]
    producer = KafkaProducer(bootstrap_servers=broker)
    for i, eid in enumerate(ids):
        producer.send(events_topic, orjson.dumps({"id": eid, "features": {"x": 2.0 if i % 2 else -2.0}}))
    producer.flush()
    producer.close()
    wait_for(lambda: status(client)["events"]["pending_labels"] >= before["events"]["pending_labels"] + 50,
             what="50 pending predictions")
    mid = status(client)
    assert mid["events"]["learned"] == before["events"]["learned"]
    labels = [{"id": eid, "label": i % 2} for i, eid in enumerate(ids)]
    r = client.post("/v1/models/default/labels", json={"labels": labels}, headers=AUTH)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 50, "topic": svc.settings.models["default"].topics.labels, "ids": ids}
    wait_for(lambda: learned(client) >= mid["events"]["learned"] + 50, what="50 joined labels learned")
    after = status(client)
    assert after["events"]["pending_labels"] == mid["events"]["pending_labels"] - 50
    assert after["labels"]["joined"] - mid["labels"]["joined"] == 50
    assert after["prequential"]["n"] == mid["prequential"]["n"] + 50
    # A label for an id the service never saw is counted, not lost silently.
    r = client.post("/v1/models/default/labels", json={"labels": [{"id": "never-seen", "label": 1}]},
                    headers=AUTH)
    assert r.status_code == 202
    wait_for(lambda: status(client)["labels"]["unknown"] >= mid["labels"]["unknown"] + 1, what="unknown label")


def test_a_classifier_takes_labels_of_one_type(client):
    # "1" and 1 would print as one JSON key in proba; true and 1 are one Python key (one class)
    body = {"instances": [{"features": {"x": 1.0}, "label": 1}, {"features": {"x": 2.0}, "label": "1"},
                          {"features": {"x": 3.0}, "label": True}]}
    r = client.post("/v1/models/default/learn", json=body, headers=AUTH)
    assert r.status_code == 422
    errors = r.json()["detail"]
    assert [e["loc"] for e in errors] == [["body", "instances", 1, "label"], ["body", "instances", 2, "label"]]
    assert errors[0]["msg"].startswith("instances[1].label: expected a number like this model's other labels")


def test_regression_model(client):
    body = {"instances": [{"id": f"r{i}", "features": {"x": float(i % 11 - 5)}, "label": 2.0 * (i % 11 - 5)}
                          for i in range(500)]}
    assert client.post("/v1/models/reg/learn", json=body, headers=AUTH).status_code == 202
    wait_for(lambda: learned(client, "reg") >= 500, what="regressor learned")

    def served():
        r = client.post("/v1/models/reg/predict", json={"instances": [{"features": {"x": 4.0}},
                                                                    {"features": {"x": -4.0}}]})
        assert r.status_code == 200
        return r.json()["predictions"]

    preds = wait_for(lambda: (p := served())[0]["label"] > p[1]["label"] and p, what="the regressor's slope")
    assert all(p["proba"] is None and isinstance(p["label"], float) for p in preds)
    assert "mae" in status(client, "reg")["prequential"]
    # A regressor needs numeric labels; the field is named.
    r = client.post("/v1/models/reg/labels", json={"labels": [{"id": "r1", "label": "big"}]}, headers=AUTH)
    assert_names(r, 422, "labels[0].label", "number")


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/models/nope/predict"), ("POST", "/v1/models/nope/labels"), ("POST", "/v1/models/nope/learn"),
    ("GET", "/v1/models/nope"), ("GET", "/v1/models/nope/history"),
])
def test_unknown_model_is_404_naming_it(client, method, path):
    r = client.request(method, path, json={"instances": [{"features": {}}]}, headers=AUTH)
    assert r.status_code == 404
    assert "'nope'" in r.json()["detail"] and "default" in r.json()["detail"]


@pytest.mark.parametrize(("path", "body", "status_code", "fragments"), [
    ("predict", b"{not json", 400, ["not valid JSON"]),
    ("predict", b"", 400, ["not valid JSON"]),
    ("predict", {"instances": []}, 422, ["instances", "at least 1"]),
    ("predict", {"instances": [{"features": {"x": [1, 2]}}]}, 422, ["instances[0].features.x", "array"]),
    ("predict", {"instances": [{"features": {"ok": 1}}, {"features": {"x": {"a": 1}}}]}, 422,
     ["instances[1].features.x", "object"]),
    ("predict", b'{"instances": [{"features": {"x": 1e999}}]}', 422, ["instances[0].features.x", "non-finite"]),
    ("predict", {"instances": [{"features": {"x": 2**70}}]}, 422, ["instances[0].features.x", "64 bits"]),
    ("predict", {"instances": [{"featurs": {"x": 1}}]}, 422, ["instances[0].featurs", "instances[0].features"]),
    ("predict", {"instances": [{"id": [1], "features": {}}]}, 422, ["instances[0].id"]),
    ("predict", [1, 2], 422, ["body"]),
    ("labels", {"labels": [{"id": "a"}]}, 422, ["labels[0].label", "required"]),
    ("labels", {"labels": [{"id": "", "label": 1}]}, 422, ["labels[0].id", "empty"]),
    ("labels", {"labels": [{"id": "a", "label": None}]}, 422, ["labels[0].label", "null"]),
    ("labels", {"labels": [{"id": "a", "label": [1]}]}, 422, ["labels[0].label", "array"]),
    ("learn", {"instances": [{"features": {"x": 1}}]}, 422, ["instances[0].label", "required"]),
    ("learn", {"instances": [{"features": {"x": "a", "y": []}, "label": 1}]}, 422, ["instances[0].features.y"]),
    ("learn", {"instances": [{"features": {}, "label": 1, "ts": "yesterday"}]}, 422, ["instances[0].ts"]),
    ("learn", {"instances": [{"features": {}, "label": 1, "ts": "123"}]}, 422, ["instances[0].ts"]),
    ("learn", {"instances": [{"features": {}, "label": 1, "ts": True}]}, 422, ["instances[0].ts"]),
    ("labels", {"labels": [{"id": 1.5, "label": 1}]}, 422, ["labels[0].id", "the number 1.5"]),
])
def test_invalid_bodies_name_the_field(client, path, body, status_code, fragments):
    content = body if isinstance(body, bytes) else json.dumps(body)
    r = client.post(f"/v1/models/default/{path}", content=content, headers=AUTH)
    assert_names(r, status_code, *fragments)


def test_mutating_routes_require_the_token(client):
    body = {"labels": [{"id": "tok-1", "label": 1}]}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        r = client.post("/v1/models/default/labels", json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "authorization" in r.json()["detail"]
        r = client.post("/v1/models/default/learn", json={"instances": [{"features": {}, "label": 1}]},
                        headers=headers)
        assert r.status_code == 401
    assert client.post("/v1/models/default/labels", json=body, headers=AUTH).status_code == 202
    # Predict is read-only: open without a token.
    assert client.post("/v1/models/default/predict", json={"instances": [{"features": {}}]}).status_code == 200


def test_oversized_bodies_are_413_declared_or_streamed(client):
    big = orjson.dumps({"instances": [{"features": {"x": "y" * 1000}}] * 100})
    assert len(big) > MAX_BODY
    r = client.post("/v1/models/default/predict", content=big)
    assert r.status_code == 413

    def chunks():  # no Content-Length: the server must count the bytes as they stream in
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = client.post("/v1/models/default/predict", content=chunks())
    assert r.status_code == 413
    r = client.post("/v1/models/default/learn", content=chunks(), headers=AUTH)
    assert r.status_code == 413
    # Just under the limit is fine, and the service lives on.
    ok = orjson.dumps({"instances": [{"features": {"x": "y" * 1000}}] * 50})
    assert len(ok) < MAX_BODY
    assert client.post("/v1/models/default/predict", content=ok).status_code == 200
    assert client.get("/healthz").status_code == 200


# -- random bodies --------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
# Mostly well-typed, so that many bodies are valid and reach the model and the broker; sometimes not.
features = st.dictionaries(st.sampled_from(["x", "y", "colour"]) | st.text(max_size=4),
                           st.one_of(scalars, scalars, scalars, json_values), max_size=4)
ids = st.one_of(st.text(min_size=1, max_size=8), st.integers(), json_values)
labels = st.one_of(st.booleans(), st.integers(-2, 2), st.floats(-5, 5), st.text(max_size=3), json_values)
predict_instance = st.fixed_dictionaries({"features": features}, optional={"id": ids})
learn_instance = st.fixed_dictionaries({"features": features, "label": labels},
                                       optional={"id": ids, "ts": st.floats(0, 2e9) | json_values})
label_item = st.fixed_dictionaries({"id": ids, "label": labels})
routes = st.sampled_from(["predict", "labels", "learn"])
cases = st.one_of(  # (route, body): shaped for the route, or anything at all
    st.tuples(st.just("predict"), st.fixed_dictionaries({"instances": st.lists(predict_instance, min_size=1,
                                                                                max_size=3)})),
    st.tuples(st.just("learn"), st.fixed_dictionaries({"instances": st.lists(learn_instance, min_size=1,
                                                                              max_size=3)})),
    st.tuples(st.just("labels"), st.fixed_dictionaries({"labels": st.lists(label_item, min_size=1, max_size=3)})),
    st.tuples(routes, json_values | st.dictionaries(st.sampled_from(["instances", "labels", "extra"]),
                                                    json_values, max_size=2)),
)


# The service runs in this process, and its Kafka clients' threads draw backoff jitter from the
# `random` module while hypothesis draws a case; hypothesis takes that for a strategy using it.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=cases, model=st.sampled_from(["default", "reg", "linear"]))
def test_random_bodies_are_answered_never_crash(client, case, model):
    route, body = case
    r = client.post(f"/v1/models/{model}/{route}", content=json.dumps(body), headers=AUTH)
    assert r.status_code in (200, 202, 400, 422), (r.status_code, r.text)
    event(f"{route} {r.status_code}")  # --hypothesis-show-statistics: valid bodies get through too
    if r.status_code >= 400:
        detail = r.json()["detail"]
        assert detail and all(d["loc"][0] == "body" and d["msg"] for d in detail)


def test_instances_the_model_cannot_score_are_a_422_naming_them_and_the_model_serves_on(client):
    instances = [{"features": {"x": 1.0}}, {"features": {"x": "one"}}, {"features": {"x": 2.0}},
                 {"features": {"x": "three", "y": 1.0}}]
    r = client.post("/v1/models/linear/predict", json={"instances": instances})
    assert_names(r, 422, "instances[1].features", "instances[3].features", "model_error", "real numbers")
    assert [d["loc"] for d in r.json()["detail"]] == [["body", "instances", 1, "features"],
                                                      ["body", "instances", 3, "features"]]
    r = client.post("/v1/models/linear/predict", json={"instances": [instances[0], instances[2]]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2


def test_a_diverged_model_is_a_503_saying_so_and_the_others_serve_on(client, svc):
    body = {"instances": [{"id": f"f{i}", "features": {"x": float(i % 3)}, "label": i % 2} for i in range(64)]}
    assert client.post("/v1/models/fragile/learn", json=body, headers=AUTH).status_code == 202
    wait_for(lambda: learned(client, "fragile") >= 64, what="64 events learned")
    wait_for(lambda: status(client, "fragile")["model_version"] > 0, what="a snapshot with classes")
    question = {"instances": [{"features": {"x": 1.0}}, {"features": {"x": 2.0}}]}
    assert client.post("/v1/models/fragile/predict", json=question).status_code == 200
    rt = svc.models["fragile"]
    next(rt.model._net.parameters()).data[0, 0] = float("nan")  # what a diverged backbone looks like
    rt._published = (rt.model_version + 1, rt.model.snapshot())  # as the writer publishes after learning
    r = client.post("/v1/models/fragile/predict", json=question)
    assert r.status_code == 503, r.text  # not NaN probabilities (null in JSON) and an arbitrary label
    assert "model 'fragile' cannot predict" in r.json()["detail"] and "diverged" in r.json()["detail"]
    assert client.post("/v1/models/default/predict", json=question).status_code == 200
    wait_for(lambda: status(client, "fragile")["diverged"], what="the status to report it")


def test_service_lives_on_after_random_bodies(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/models/default/predict", json={"instances": [{"features": {"x": 1}}]}).status_code == 200


# -- read-only routes -------------------------------------------------------------------------------

def test_status_routes_follow_the_contract(client):
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["default", "reg", "linear", "fragile"]
    s = status(client)
    for key in ("name", "model_version", "events", "prequential", "estimated", "drift", "learning_rate",
                "kalman_gamma", "checkpoint", "consumer_lag"):
        assert key in s
    assert set(s["events"]) >= {"predicted", "learned", "pending_labels", "dead_letters"}
    assert set(s["checkpoint"]) >= {"seq", "ts"}
    history = client.get("/v1/models/default/history").json()
    assert set(history) == {"points", "drift_events"}
    # the status page asks only for the points after the last it has (it fetched 3,600 every 2 s)
    points = wait_for(lambda: len(p := client.get("/v1/models/default/history").json()["points"]) >= 3 and p,
                      what="three history points")
    newer = client.get("/v1/models/default/history", params={"since": points[-3]["ts"]}).json()["points"]
    assert [p["ts"] for p in newer[:2]] == [p["ts"] for p in points[-2:]]


def test_metrics_agree_with_status_and_count_predict_batches(client):
    def scrape():
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(client.get("/metrics").text) for s in fam.samples}

    before = scrape()
    for _ in range(3):
        assert client.post("/v1/models/reg/predict", json={"instances": [{"features": {"x": 1}}]}).status_code == 200
    samples = scrape()
    key = ("streamlearn_predict_seconds_count", (("model", "reg"),))
    assert samples[key] == before.get(key, 0) + 3
    s = status(client)
    assert samples[("streamlearn_events_total", (("model", "default"), ("outcome", "learned")))] \
        >= s["events"]["learned"] - 0  # scraped before the status read: never ahead of it
    assert ("streamlearn_pending_labels", (("model", "default"),)) in samples


def test_health_docs_and_status_page(client, svc):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True}
    spec = client.get("/openapi.json").json()
    for path in ("/v1/models/{name}/predict", "/v1/models/{name}/labels", "/v1/models/{name}/learn",
                 "/v1/models", "/v1/models/{name}", "/v1/models/{name}/history", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/PredictRequest")
    assert "PredictRequest" in spec["components"]["schemas"]
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert spec["paths"]["/v1/models/{name}/learn"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/v1/models/{name}/predict"]["post"]  # open to read
    assert "404" in spec["paths"]["/v1/models/{name}"]["get"]["responses"]
    for path, method, code, model in (("/v1/models/{name}/predict", "post", "200", "PredictResponse"),
                                      ("/v1/models/{name}/labels", "post", "202", "Accepted")):
        # exactly the model: a response class FastAPI did not know as JSON added "type": "string"
        response = spec["paths"][path][method]["responses"][code]["content"]["application/json"]["schema"]
        assert response == {"$ref": f"#/components/schemas/{model}"}, response
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    # every script and stylesheet from the service itself: the default page loaded them from a CDN
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    asset = next(p for p in sorted(STATIC_DIR.rglob("*")) if p.is_file() and p.name != "index.html")
    r = client.get(f"/static/{asset.relative_to(STATIC_DIR).as_posix()}")
    assert r.status_code == 200 and r.content == asset.read_bytes()


def test_readyz_is_503_until_the_runtime_consumes(svc):
    idle = Service(svc.settings)  # configured, not started
    with serving(idle) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"ready": False}
        assert c.get("/healthz").status_code == 200


def test_a_client_gone_mid_body_leaves_no_traceback(client, caplog):
    # uvicorn logged "Exception in ASGI application" and ~80 lines of ClientDisconnect for each
    host, port = client.base_url.host, client.base_url.port
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST /v1/models/default/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + b'{"instances": [')
            time.sleep(0.1)
    time.sleep(0.5)
    # (uvicorn's records only: the service's Kafka clients may log their own errors meanwhile)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("uvicorn")], caplog.text
    assert client.get("/healthz").status_code == 200


def test_a_body_that_never_finishes_is_cut_off(client, svc, monkeypatch):
    # a client trickling its body (or stalling) held the connection for ever
    monkeypatch.setattr(svc.settings.http, "body_timeout_seconds", 0.5)
    host, port = client.base_url.host, client.base_url.port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /v1/models/default/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"instances": [')
        start = time.monotonic()
        answer = b""  # the headers and the body may come in separate segments
        while not re.search(rb"content-length: (\d+)\r\n.*\r\n\r\n", answer, re.S) or len(
                answer.partition(b"\r\n\r\n")[2]) < int(re.search(rb"content-length: (\d+)", answer)[1]):
            if not (part := s.recv(4096)):
                break
            answer += part
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "http.body_timeout_seconds" in answer
    assert time.monotonic() - start < 5

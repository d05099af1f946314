"""create_app: configuration order and the SECRET_KEY rule (CONTRACT §2)."""
import pytest

from app import create_app


def test_secret_key_is_required_outside_debug_and_testing(tmp_path, monkeypatch):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    with pytest.raises(RuntimeError, match="SECRET_KEY must be set"):
        create_app({"SECRET_KEY": "", "DATABASE_URL": f"sqlite:///{tmp_path / 'a.sqlite3'}"})


def test_environment_wins_and_flask_prefixed_keys_are_parsed(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_KEY", "from-env")
    monkeypatch.setenv("FLASK_REALTIME_HEARTBEAT_S", "3")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'b.sqlite3'}")
    app = create_app()
    try:
        assert app.config["SECRET_KEY"] == "from-env"
        assert app.config["REALTIME_HEARTBEAT_S"] == 3
        assert app.extensions["realtime"].heartbeat_s == 3
    finally:
        app.extensions["realtime"].shutdown()
        app.extensions["jobs"].shutdown()
        app.extensions["database"].dispose()


def test_keys_from_flask_variables_stay_text(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_KEY", "s")
    monkeypatch.setenv("FLASK_REALTIME_PUBLISH_KEY", "12345")  # JSON would make it an int
    app = create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'c.sqlite3'}"})
    try:
        response = app.test_client().post(
            "/api/realtime/publish", json={"channel": "c", "topic": "t", "data": 1},
            headers={"Authorization": "Bearer 12345"},
        )
        assert response.status_code == 201
    finally:
        app.extensions["realtime"].shutdown()
        app.extensions["database"].dispose()


def test_a_wrong_method_is_a_json_405_that_names_the_allowed_ones(client):
    response = client.get("/api/realtime/publish")
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]

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

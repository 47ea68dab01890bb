"""The composition root: a store that cannot be opened stops start-up without showing its password."""

from __future__ import annotations

from gateway.runtime import StartupError, _without_password, open_store
from gateway.settings import load_settings
from tests.conftest import free_port, run


def test_a_drivers_message_loses_the_password_it_quotes() -> None:
    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": "postgresql://lockgate:s3cr%2Ft@db.internal/lockgate"})

    assert _without_password(settings, "auth failed for lockgate:s3cr/t@db.internal") == \
        "auth failed for lockgate:***@db.internal"


def test_a_store_that_cannot_be_reached_stops_start_up_without_the_password() -> None:
    url = f"postgresql://lockgate:s3cret@127.0.0.1:{free_port()}/lockgate"  # nobody listens there
    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": url})

    try:
        run(open_store(settings))
    except StartupError as exc:
        message = str(exc)
    else:
        raise AssertionError("a store nobody answers for was opened")

    assert message.startswith("cannot open the store at 127.0.0.1:")
    assert "s3cret" not in message

"""A deadlock or serialization failure that still happens is run again where that is safe, and
otherwise answered with 409 and its true reason (logged), never "the database is unavailable"."""

from __future__ import annotations

import logging
import threading

import pytest
from django.db import OperationalError, connection, transaction
from django.test import RequestFactory

from portal.middleware import unavailable_response, unavailable_status
from search.locking import conflict_kind, retry_on_conflict

pytestmark = pytest.mark.django_db(transaction=True)


def _lock_both(first, second, barrier, errors):
    from django.contrib.auth import get_user_model

    users = get_user_model().objects
    try:
        with transaction.atomic():
            users.select_for_update().get(pk=first)
            barrier.wait(timeout=10)
            users.select_for_update().get(pk=second)
    except OperationalError as exc:
        errors.append(exc)
    finally:
        connection.close()


def a_real_deadlock(one, two) -> OperationalError:
    """Two transactions locking two rows in opposite orders: PostgreSQL picks one to fail."""
    barrier, errors = threading.Barrier(2), []
    threads = [threading.Thread(target=_lock_both, args=(a, b, barrier, errors)) for a, b in ((one, two), (two, one))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture
def two_rows(django_user_model):
    return [django_user_model.objects.create_user(f"writer-{i}").pk for i in range(2)]


def test_a_deadlock_is_told_apart_from_an_outage(two_rows):
    error = a_real_deadlock(*two_rows)
    assert conflict_kind(error) == "deadlock"
    status, reason, _ = unavailable_status(error)
    assert status == 409 and "same moment" in reason and "unavailable" not in reason
    outage = OperationalError("connection refused")
    assert conflict_kind(outage) is None
    assert unavailable_status(outage)[:2] == (503, "The database is unavailable; try again in a few seconds.")


def test_a_conflict_that_reaches_a_request_answers_409_and_the_log_says_why(two_rows, caplog):
    error = a_real_deadlock(*two_rows)
    request = RequestFactory().delete("/api/assets/5/")
    with caplog.at_level(logging.WARNING, logger="portal.middleware"):
        response = unavailable_response(request, error)
    assert response.status_code == 409 and response["Retry-After"] == "1"
    assert b"same moment" in response.content
    assert any("409" in r.getMessage() and "40P01" in r.getMessage() for r in caplog.records)


def test_a_transaction_that_deadlocks_is_run_again_and_then_succeeds(two_rows):
    from django.contrib.auth import get_user_model

    attempts = []

    @retry_on_conflict
    def rename():
        attempts.append(1)
        if len(attempts) == 1:
            raise a_real_deadlock(*two_rows)  # what the first attempt ran into
        with transaction.atomic():
            get_user_model().objects.filter(pk=two_rows[0]).update(first_name="renamed")
        return "done"

    assert rename() == "done" and len(attempts) == 2
    assert get_user_model().objects.get(pk=two_rows[0]).first_name == "renamed"


def test_inside_a_callers_transaction_a_conflict_is_not_retried(two_rows):
    error = a_real_deadlock(*two_rows)
    attempts = []

    @retry_on_conflict
    def nested():
        attempts.append(1)
        raise error

    with pytest.raises(OperationalError), transaction.atomic():
        nested()
    assert len(attempts) == 1

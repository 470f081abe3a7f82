"""Subscriptions belong to whoever created them: only the owner (and admins) see and change them.

The governed API over SQLite and PostgreSQL, real tokens, a real HTTP receiver for the
notifications. A subscription's endpoint and receiverInfo can hold a receiver's secrets, and
changing the endpoint redirects data: for anyone but its owner and admins it does not exist.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi.testclient import TestClient

from cityward.bank.subscriptions.service import Subscriptions
from tests.bank.subscriptions import conftest as subscriptions
from tests.bank.subscriptions.conftest import Receiver
from tests.governance.conftest import AIR, TRAFFIC, E, Governed

S = "/ngsi-ld/v1/subscriptions"
PROBLEM = "https://uri.etsi.org/ngsi-ld/errors/"
SECRET = "Bearer SECRET-of-env-agency"
# the subscription suite's HTTP receiver (a real server in a thread), as this module's fixture
receiver = subscriptions.receiver


def ids_after(receiver: Receiver, c: TestClient, admin: dict[str, str]) -> list[str]:
    """Change the air-quality entity, then the traffic one; the entity ids notified.

    One endpoint's notifications arrive in order: once the traffic change is in, one of the
    air-quality change would have come first."""
    assert c.patch(f"{E}/{AIR}/attrs", json={"no2": 41}, headers=admin).status_code == 204
    r = c.patch(f"{E}/{TRAFFIC}/attrs", json={"intensity": 9}, headers=admin)
    assert r.status_code == 204

    def ids() -> list[str]:
        return [e["id"] for req in receiver.on("/n") for e in req.body["data"]]

    deadline = time.monotonic() + 20
    while TRAFFIC not in ids():
        assert time.monotonic() < deadline, receiver.requests
        time.sleep(0.05)
    return ids()


def env_feed(
    sid: str, uri: str = "http://env-agency.example/notify", secret: str = SECRET
) -> dict[str, Any]:
    return {
        "id": sid,
        "type": "Subscription",
        "watchedAttributes": ["no2", "intensity"],
        "notification": {
            "endpoint": {
                "uri": uri,
                "accept": "application/json",
                "receiverInfo": [{"key": "Authorization", "value": secret}],
            }
        },
    }


def listed(c: TestClient, headers: dict[str, str]) -> tuple[list[str], str]:
    r = c.get(S, params={"count": "true"}, headers=headers)
    assert r.status_code == 200, r.text
    return [s["id"] for s in r.json()], r.headers["NGSILD-Results-Count"]


def assert_not_found(r: Any) -> None:
    assert r.status_code == 404, r.text
    problem = r.json()
    assert problem["type"] == PROBLEM + "ResourceNotFound"
    assert problem["field"] == "subscriptionId"
    assert SECRET not in r.text


def test_only_the_owner_sees_and_changes_its_subscription(governed: Governed) -> None:
    c = governed.client
    owner, analyst, other = (governed.as_(w) for w in ("operator-air", "analyst", "operator"))
    sid = "urn:ngsi-ld:Subscription:env-feed"
    assert c.post(S, json=env_feed(sid), headers=owner).status_code == 201
    # the analyst's role may manage subscriptions too: its own
    mine = "urn:ngsi-ld:Subscription:analyst-feed"
    r = c.post(S, json=env_feed(mine, secret="Bearer analyst-own"), headers=analyst)
    assert r.status_code == 201, r.text

    for who in (analyst, other):
        r = c.get(S, headers=who)
        assert r.status_code == 200 and sid not in r.text and SECRET not in r.text
        assert_not_found(c.get(f"{S}/{sid}", headers=who))
        hijack = {"notification": {"endpoint": {"uri": "http://attacker.example/x"}}}
        assert_not_found(c.patch(f"{S}/{sid}", json=hijack, headers=who))
        assert_not_found(c.delete(f"{S}/{sid}", headers=who))
    assert listed(c, analyst) == ([mine], "1")
    assert listed(c, other) == ([], "0")
    assert listed(c, owner) == ([sid], "1")

    # nothing changed, and the owner still manages it
    got = c.get(f"{S}/{sid}", headers=owner).json()
    assert got["notification"]["endpoint"]["uri"] == "http://env-agency.example/notify"
    r = c.patch(f"{S}/{sid}", json={"description": "env agency"}, headers=owner)
    assert r.status_code == 204, r.text
    # the owner is not a member a body can set or change
    r = c.patch(f"{S}/{sid}", json={"owner": "someone-else"}, headers=owner)
    assert r.status_code == 400 and r.json()["field"] == "owner"
    r = c.post(S, json={**env_feed(sid + "2"), "owner": "someone-else"}, headers=analyst)
    assert r.status_code == 400 and r.json()["field"] == "owner"
    assert c.delete(f"{S}/{sid}", headers=owner).status_code == 204
    assert c.get(f"{S}/{sid}", headers=governed.as_("admin")).status_code == 404


def test_admins_manage_every_subscription_and_keep_its_owner_and_purposes(
    governed: Governed, receiver: Receiver
) -> None:
    c = governed.client
    owner, admin = governed.as_("operator"), governed.as_("admin")
    sid = "urn:ngsi-ld:Subscription:traffic-feed"
    assert c.post(S, json=env_feed(sid, receiver.url("/n")), headers=owner).status_code == 201
    assert sid in listed(c, admin)[0]
    assert c.get(f"{S}/{sid}", headers=admin).status_code == 200
    r = c.patch(f"{S}/{sid}", json={"description": "checked by the admin"}, headers=admin)
    assert r.status_code == 204, r.text
    # still the operator's, bound to the operator's purposes (traffic-management): the admin's
    # change did not give it the admin's every purpose
    got = c.get(f"{S}/{sid}", headers=owner)
    assert got.status_code == 200 and got.json()["description"] == "checked by the admin"
    assert ids_after(receiver, c, admin) == [TRAFFIC]
    assert c.delete(f"{S}/{sid}", headers=admin).status_code == 204
    assert_not_found(c.get(f"{S}/{sid}", headers=owner))


def test_a_subscription_without_an_owner_is_for_admins_only_and_keeps_working(
    governed: Governed, receiver: Receiver
) -> None:
    """A subscription stored before owners were recorded: its row has no owner at all."""
    c = governed.client
    admin = governed.as_("admin")
    sid = "urn:ngsi-ld:Subscription:from-before"
    assert c.post(S, json=env_feed(sid, receiver.url("/n")), headers=admin).status_code == 201
    subs: Subscriptions = governed.app.state.subscriptions
    (body,) = subs.store.select("SELECT body FROM subscriptions WHERE id = ?", [sid])[0]
    old = orjson.loads(body)
    old.pop("owner", None)
    old["ownerPurposes"] = ["traffic-management"]  # an operator's, from before
    with subs.store.write("", create_tenant=False) as txn:
        txn.execute(
            "UPDATE subscriptions SET body = ? WHERE id = ?", [orjson.dumps(old).decode(), sid]
        )
        txn.execute("UPDATE subscriptions_version SET v = v + 1 WHERE k = 1")

    for who in ("operator", "analyst"):
        headers = governed.as_(who)
        assert sid not in listed(c, headers)[0]
        assert_not_found(c.get(f"{S}/{sid}", headers=headers))
        assert_not_found(c.patch(f"{S}/{sid}", json={"isActive": False}, headers=headers))
        assert_not_found(c.delete(f"{S}/{sid}", headers=headers))
    assert sid in listed(c, admin)[0]
    r = c.patch(f"{S}/{sid}", json={"description": "kept"}, headers=admin)
    assert r.status_code == 204, r.text
    # it still delivers, within the purposes it was bound to
    assert ids_after(receiver, c, admin) == [TRAFFIC]
    assert c.delete(f"{S}/{sid}", headers=admin).status_code == 204

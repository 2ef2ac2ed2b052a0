"""EventStoreDB's Python client (kurrentdbclient, from PyPI) against Refract's gRPC API.

Run by tests/esdb_grpc.rs with the server's connection string; fails with a traceback when
anything differs from what the client expects of EventStoreDB.
"""

import json
import sys
import uuid

from kurrentdbclient import KurrentDBClient, NewEvent, StreamState
from kurrentdbclient.exceptions import NotFoundError, WrongCurrentVersionError


def event(event_type, data):
    return NewEvent(type=event_type, data=json.dumps(data).encode(), id=uuid.uuid4())


def main(uri):
    client = KurrentDBClient(uri=uri)
    stream = "py-order-1"

    # One event goes through Append, several through BatchAppend.
    position = client.append_to_stream(
        stream, events=event("OrderPlaced", {"order": 1}), current_version=StreamState.NO_STREAM
    )
    assert position >= 0, position
    items = [event("ItemAdded", {"sku": "a", "n": 1}), event("ItemAdded", {"sku": "b", "n": 2})]
    client.append_to_stream(stream, events=items, current_version=0)
    try:
        client.append_to_stream(stream, events=[event("Late", {})], current_version=0)
        raise AssertionError("a wrong current version was accepted")
    except WrongCurrentVersionError:
        pass
    shipped = event("OrderShipped", {"order": 1})
    client.append_to_stream(stream, events=[shipped], current_version=2)
    assert client.get_current_version(stream) == 3

    recorded = client.get_stream(stream)
    assert [e.type for e in recorded] == ["OrderPlaced", "ItemAdded", "ItemAdded", "OrderShipped"]
    assert [e.stream_position for e in recorded] == [0, 1, 2, 3]
    assert recorded[3].id == shipped.id
    assert json.loads(recorded[1].data) == {"sku": "a", "n": 1}
    assert recorded[0].content_type == "application/json"
    backwards = client.get_stream(stream, backwards=True, limit=2)
    assert [e.stream_position for e in backwards] == [3, 2]
    try:
        client.get_stream("py-nothing")
        raise AssertionError("a missing stream was found")
    except NotFoundError:
        pass

    # `$all` with the client's default filter (a regular expression excluding system events).
    ours = [e for e in client.read_all() if e.stream_name == stream]
    assert len(ours) == 4, ours
    assert all(not e.type.startswith("$") for e in client.read_all())
    last = client.get_commit_position()
    assert last == ours[-1].commit_position, (last, ours[-1].commit_position)

    # Catch-up subscriptions: a stream from the start; `$all` by an event-type prefix.
    with client.subscribe_to_stream(stream) as subscription:
        positions = [next(subscription).stream_position for _ in range(4)]
    assert positions == [0, 1, 2, 3], positions
    with client.subscribe_to_all(filter_include=["Item"], filter_by_prefix=True) as subscription:
        types = [next(subscription).type for _ in range(2)]
    assert types == ["ItemAdded", "ItemAdded"], types

    # A persistent subscription: ack, park, and the group's info.
    client.create_subscription_to_stream("py-workers", stream, from_end=False)
    subscription = client.read_subscription_to_stream("py-workers", stream)
    seen = []
    for recorded_event in subscription:
        seen.append(recorded_event.stream_position)
        if recorded_event.stream_position == 2:
            subscription.nack(recorded_event, action="park")
        else:
            subscription.ack(recorded_event)
        if len(seen) == 4:
            break
    subscription.stop()
    assert seen == [0, 1, 2, 3], seen
    info = client.get_subscription_info("py-workers", stream)
    assert info.group_name == "py-workers", info
    assert [s.group_name for s in client.list_subscriptions()] == ["py-workers"]
    client.delete_subscription("py-workers", stream)
    try:
        client.get_subscription_info("py-workers", stream)
        raise AssertionError("a deleted group was found")
    except NotFoundError:
        pass

    # `$all` groups with the client's default filter.
    client.create_subscription_to_all("py-audit", from_end=False)
    subscription = client.read_subscription_to_all("py-audit")
    first = next(subscription)
    assert first.stream_name == stream, first
    subscription.ack(first)
    subscription.stop()

    client.close()
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])

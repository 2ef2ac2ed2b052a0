"""Write Refract projections in Python.

A projection is a function of ``(state, event, ctx)``; the ``projection`` decorator names what it
reads and how its state is divided::

    from dataclasses import dataclass
    from refract_guest import Ctx, Event, WitWorld, projection

    @dataclass
    class Order:
        lines: int = 0
        total_cents: int = 0

    @projection(category="order", partition="stream")
    def apply(order: Order, event: Event, ctx: Ctx):
        if event.event_type == "ItemAdded":
            order.lines += 1
            order.total_cents += event.json()["price_cents"]

The module built into the component must expose ``WitWorld`` (the component's exports), hence
its import. States are loaded once per partition per batch and written back only when they
changed. They and table rows are stored as compact JSON written the way the Rust SDK's serde
writes them: dataclass fields in declaration order (like a Rust struct), dict keys sorted (like a
``BTreeMap``). The same logic therefore gives the same digest in Python, JavaScript and Rust.
"""

import dataclasses
import json
import sys
import traceback
import typing

from componentize_py_types import Err
from wit_world.imports import host, types

# A line printed reaches the server's log at once, even if a later event traps the guest.
sys.stdout.reconfigure(line_buffering=True)
sys.stderr.reconfigure(line_buffering=True)

__all__ = [
    "Ctx",
    "Event",
    "Table",
    "WitWorld",
    "fnv1a_64",
    "from_json",
    "projection",
    "to_json",
]


class Event:
    """An event of the log, as a projection sees it."""

    __slots__ = ("_raw",)

    def __init__(self, raw: types.Event):
        self._raw = raw

    @property
    def stream(self) -> str:
        """The stream it was appended to."""
        return self._raw.stream

    @property
    def revision(self) -> int:
        """Its number in its stream, from 0."""
        return self._raw.revision

    @property
    def position(self) -> int:
        """Its position in the log, from 0."""
        return self._raw.position

    @property
    def id(self) -> str:
        return self._raw.id

    @property
    def event_type(self) -> str:
        return self._raw.event_type

    @property
    def data(self) -> bytes:
        """The payload's bytes: JSON text unless it was written as binary."""
        return self._raw.data

    @property
    def metadata(self) -> bytes:
        """The metadata's bytes: a JSON object's text, or empty."""
        return self._raw.metadata

    @property
    def created_ms(self) -> int:
        """When it was appended, in milliseconds since the Unix epoch."""
        return self._raw.created_ms

    def json(self, cls: typing.Any = None) -> typing.Any:
        """The payload parsed from JSON, as ``cls`` (a dataclass, say) when given."""
        try:
            return from_json(self._raw.data, cls)
        except Exception as error:
            raise ValueError(
                f"the data of {self.event_type} {self.revision}@{self.stream} "
                f"is not the JSON expected: {error}"
            ) from error

    def metadata_json(self, cls: typing.Any = None) -> typing.Any:
        """The metadata parsed from JSON; ``None`` when the event has none."""
        if not self._raw.metadata:
            return None
        return from_json(self._raw.metadata, cls)

    def __repr__(self) -> str:
        return f"Event({self.event_type} {self.revision}@{self.stream}, position {self.position})"


class Table:
    """One read-model table of the projection: JSON rows by key."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def get(self, key: str, cls: typing.Any = None) -> typing.Any:
        """The row at ``key`` (as ``cls`` when given), or ``None``."""
        row = host.table_get(self._name, key)
        return None if row is None else from_json(row, cls)

    def put(self, key: str, value: typing.Any) -> None:
        host.table_put(self._name, key, to_json(value))

    def delete(self, key: str) -> None:
        host.table_delete(self._name, key)


class Ctx:
    """What a projection can do besides changing its state: tables, emits, links, logs."""

    __slots__ = ("_current", "_told")

    def __init__(self):
        self._current = 0
        self._told = None

    def table(self, name: str) -> Table:
        return Table(name)

    def may_emit(self) -> bool:
        """Whether the projection was deployed with permission to emit events (``--emit``)."""
        return host.may_emit()

    def emit(self, stream: str, event_type: str, data: typing.Any, metadata: typing.Any = None):
        """Appends an event with ``data`` as its JSON payload to ``stream``."""
        encoded_data = to_json(data)
        encoded_metadata = b"" if metadata is None else to_json(metadata)
        if encoded_metadata == b"{}":
            encoded_metadata = b""
        self._tell_cause()
        try:
            host.emit(stream, event_type, encoded_data, encoded_metadata)
        except Err as error:
            raise RuntimeError(f"cannot emit {event_type} to {stream}: {error.value}") from None

    def link_to(self, stream: str, event: Event) -> None:
        """Adds a link to ``event`` to ``stream`` (a stream that holds only links)."""
        try:
            host.link_to(stream, event.position)
        except Err as error:
            raise RuntimeError(f"cannot link to {stream}: {error.value}") from None

    def log(self, message: str) -> None:
        """Writes a line to the server's log (``print`` does too)."""
        host.log(message)

    def _tell_cause(self):
        # Emitted events get the id of the event they come from as `$causationId`.
        if self._told != self._current:
            host.caused_by(self._current)
            self._told = self._current


def fnv1a_64(data: bytes) -> int:
    """FNV-1a, 64 bits, as the Rust SDK's ``fnv1a_64``."""
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def to_json(value: typing.Any) -> bytes:
    """Compact JSON as serde writes it: dataclass fields in order, dict keys sorted."""
    return _ENCODER.encode(_plain(value)).encode()


_SCALARS = (str, int, float, bool, type(None))


def _plain(value):
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        return {key: _plain(value[key]) for key in sorted(value)}
    if kind is list or kind is tuple:
        return [_plain(item) for item in value]
    names = _FIELDS.get(kind)
    if names is not None or dataclasses.is_dataclass(kind):
        return {name: _plain(getattr(value, name)) for name in names or _field_names(kind)}
    # Subclasses of the types above.
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, dict):
        return {key: _plain(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    raise TypeError(f"cannot write a {kind.__name__} as JSON")


def from_json(data: bytes, cls: typing.Any = None) -> typing.Any:
    """Parses JSON; as ``cls`` when given (dataclasses, ``dict[K, V]``, ``list[T]``, nested)."""
    value = json.loads(data.decode())
    decode = _decoder(cls)
    return value if decode is None or value is None else decode(value)


_FIELDS: dict = {}


def _field_names(cls) -> tuple:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(field.name for field in dataclasses.fields(cls))
    return names


# Per type: a function that shapes parsed JSON as that type, or None where the parsed value is
# what is wanted (numbers, strings, Any).
_DECODERS: dict = {}


def _decoder(cls):
    try:
        return _DECODERS[cls]
    except KeyError:
        decoder = _DECODERS[cls] = _make_decoder(cls)
        return decoder
    except TypeError:  # an unhashable annotation
        return None


def _make_decoder(cls):
    if cls is None or cls is typing.Any:
        return None
    if cls is float:
        # JSON does not tell 5 from 5.0; serde writes an f64 as 5.0.
        return float
    if dataclasses.is_dataclass(cls):
        fields = None

        def decode_dataclass(value):
            nonlocal fields
            if fields is None:
                # Resolved on first use, so a dataclass may refer to itself.
                hints = typing.get_type_hints(cls)
                fields = [(name, _decoder(hints.get(name))) for name in _field_names(cls)]
            arguments = {}
            for name, decode in fields:
                if name in value:
                    item = value[name]
                    arguments[name] = item if decode is None or item is None else decode(item)
            return cls(**arguments)

        return decode_dataclass
    origin = typing.get_origin(cls)
    arguments = typing.get_args(cls)
    if origin is dict and len(arguments) == 2:
        key, item = arguments[0], _decoder(arguments[1])
        if key is int:
            return lambda value: {
                int(name): entry if item is None or entry is None else item(entry)
                for name, entry in value.items()
            }
        if item is None:
            return None
        return lambda value: {
            name: entry if entry is None else item(entry) for name, entry in value.items()
        }
    if origin is list and arguments:
        item = _decoder(arguments[0])
        if item is None:
            return None
        return lambda value: [entry if entry is None else item(entry) for entry in value]
    if origin is typing.Union:
        present = [argument for argument in arguments if argument is not type(None)]
        return _decoder(present[0]) if len(present) == 1 else None
    return None


class _Definition:
    def __init__(self, apply, source, event_types, partitioning, partition_by, state):
        self.apply = apply
        self.source = source
        self.event_types = event_types
        self.partitioning = partitioning
        self.partition_by = partition_by
        self.state = state


_definition = None

_NO_STATE = object()


def projection(
    apply=None,
    *,
    category: typing.Optional[str] = None,
    categories: typing.Optional[typing.List[str]] = None,
    stream: typing.Optional[str] = None,
    streams: typing.Optional[typing.List[str]] = None,
    event_types: typing.Sequence[str] = (),
    partition: str = "none",
    partition_by: typing.Optional[typing.Callable[[Event], typing.Optional[str]]] = None,
    state: typing.Any = _NO_STATE,
):
    """Makes ``apply(state, event, ctx)`` the component's projection.

    The source is every event unless ``category``/``categories`` or ``stream``/``streams`` say
    otherwise; ``event_types`` lets only those types through. ``partition`` is ``"none"`` (one
    state) or ``"stream"``; ``partition_by`` gives each event's partition key (``None`` skips it).
    The state's class is ``state``, or the annotation of ``apply``'s first parameter, or
    ``dict``; ``state=None`` keeps no state. ``apply`` changes the state in place or returns a
    new one.
    """

    def register(apply):
        global _definition
        if categories is not None or category is not None:
            source = types.Source_Categories(list(categories or []) + ([category] if category else []))
        elif streams is not None or stream is not None:
            source = types.Source_Streams(list(streams or []) + ([stream] if stream else []))
        else:
            source = types.Source_All()
        if partition_by is not None:
            partitioning = types.Partitioning_Custom()
        elif partition == "stream":
            partitioning = types.Partitioning_ByStream()
        elif partition == "none":
            partitioning = types.Partitioning_None_()
        else:
            raise ValueError(f'partition is "none" or "stream", not {partition!r}')
        cls = state
        if cls is _NO_STATE:
            hints = typing.get_type_hints(apply)
            parameters = apply.__code__.co_varnames[: apply.__code__.co_argcount]
            cls = hints.get(parameters[0], dict) if parameters else dict
        _definition = _Definition(apply, source, list(event_types), partitioning, partition_by, cls)
        return apply

    return register(apply) if apply is not None else register


def _new_state(cls):
    return None if cls is None or cls is type(None) else cls()


def _where(event: Event) -> str:
    return f"{event.event_type} at position {event.position} ({event.revision}@{event.stream})"


def _failure(event: Event, error: BaseException) -> str:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    # The frames below the SDK's own call are the projection's.
    text = "".join(line for line in lines if "refract_guest.py" not in line)
    return f"{_where(event)}: {type(error).__name__}: {error}\n{text.rstrip()}"


def _handle(events):
    definition = _definition
    if definition is None:
        raise Err("the module defines no projection: decorate a function with @projection")
    apply = definition.apply
    partitioning = definition.partitioning
    by_stream = isinstance(partitioning, types.Partitioning_ByStream)
    custom = definition.partition_by
    cls = definition.state
    ctx = Ctx()
    # Per partition: [state, stored bytes or None].
    states = {}
    for raw in events:
        event = Event(raw)
        if custom is not None:
            try:
                key = custom(event)
            except Exception as error:
                raise Err(_failure(event, error)) from None
            if key is None:
                continue
        elif by_stream:
            key = raw.stream
        else:
            key = ""
        loaded = states.get(key)
        if loaded is None:
            stored = host.get_state(key)
            try:
                state = _new_state(cls) if stored is None else from_json(stored, cls)
            except Exception as error:
                raise Err(f"the stored state of partition {key!r} does not parse: {error}") from None
            loaded = states[key] = [state, stored]
        ctx._current = raw.position
        try:
            changed = apply(loaded[0], event, ctx)
        except Exception as error:
            raise Err(_failure(event, error)) from None
        if changed is not None:
            loaded[0] = changed
    try:
        untouched = to_json(_new_state(cls))
    except Exception as error:
        raise Err(f"cannot encode a new state: {type(error).__name__}: {error}") from None
    for key, (state, stored) in states.items():
        try:
            data = to_json(state)
        except Exception as error:
            raise Err(
                f"cannot encode the state of partition {key!r}: {type(error).__name__}: {error}"
            ) from None
        if data != (untouched if stored is None else stored):
            host.set_state(key, data)


class WitWorld:
    """The component's exports, which the ``@projection`` function implements."""

    def describe(self) -> types.Info:
        if _definition is None:
            raise RuntimeError("the module defines no projection: decorate a function with @projection")
        return types.Info(_definition.source, _definition.event_types, _definition.partitioning)

    def partition_key(self, e: types.Event) -> typing.Optional[str]:
        if _definition is None or _definition.partition_by is None:
            return None
        event = Event(e)
        try:
            return _definition.partition_by(event)
        except Exception as error:
            # The call has no way to return an error: say why on stderr, then trap.
            print(_failure(event, error), file=sys.stderr)
            raise
        finally:
            sys.stdout.flush()

    def handle(self, events: typing.List[types.Event]) -> None:
        try:
            _handle(events)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()

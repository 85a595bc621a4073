from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("id_str", "id_int", "connection_established", "subscribe", "subscribed", "unsubscribe", "unsubscribed", "publish", "published", "heartbeat", "heartbeat_ack", "message", "error", "presence", "join", "leave", "occupancy")
    ID_STR_FIELD_NUMBER: _ClassVar[int]
    ID_INT_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ESTABLISHED_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    OCCUPANCY_FIELD_NUMBER: _ClassVar[int]
    id_str: str
    id_int: int
    connection_established: ConnectionEstablished
    subscribe: Subscribe
    subscribed: Subscribed
    unsubscribe: Unsubscribe
    unsubscribed: Unsubscribed
    publish: Publish
    published: Published
    heartbeat: Heartbeat
    heartbeat_ack: HeartbeatAck
    message: Message
    error: Error
    presence: Presence
    join: Join
    leave: Leave
    occupancy: Occupancy
    def __init__(self, id_str: _Optional[str] = ..., id_int: _Optional[int] = ..., connection_established: _Optional[_Union[ConnectionEstablished, _Mapping]] = ..., subscribe: _Optional[_Union[Subscribe, _Mapping]] = ..., subscribed: _Optional[_Union[Subscribed, _Mapping]] = ..., unsubscribe: _Optional[_Union[Unsubscribe, _Mapping]] = ..., unsubscribed: _Optional[_Union[Unsubscribed, _Mapping]] = ..., publish: _Optional[_Union[Publish, _Mapping]] = ..., published: _Optional[_Union[Published, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ..., message: _Optional[_Union[Message, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., presence: _Optional[_Union[Presence, _Mapping]] = ..., join: _Optional[_Union[Join, _Mapping]] = ..., leave: _Optional[_Union[Leave, _Mapping]] = ..., occupancy: _Optional[_Union[Occupancy, _Mapping]] = ...) -> None: ...

class ConnectionEstablished(_message.Message):
    __slots__ = ("connection_id", "server_id", "heartbeat_interval", "timestamp")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    server_id: str
    heartbeat_interval: int
    timestamp: float
    def __init__(self, connection_id: _Optional[str] = ..., server_id: _Optional[str] = ..., heartbeat_interval: _Optional[int] = ..., timestamp: _Optional[float] = ...) -> None: ...

class Subscribe(_message.Message):
    __slots__ = ("channel", "since", "token", "rewind", "occupancy", "delta")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    REWIND_FIELD_NUMBER: _ClassVar[int]
    OCCUPANCY_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    channel: str
    since: int
    token: str
    rewind: int
    occupancy: bool
    delta: str
    def __init__(self, channel: _Optional[str] = ..., since: _Optional[int] = ..., token: _Optional[str] = ..., rewind: _Optional[int] = ..., occupancy: _Optional[bool] = ..., delta: _Optional[str] = ...) -> None: ...

class Subscribed(_message.Message):
    __slots__ = ("channel", "seq", "recovered", "delta")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    channel: str
    seq: int
    recovered: bool
    delta: str
    def __init__(self, channel: _Optional[str] = ..., seq: _Optional[int] = ..., recovered: _Optional[bool] = ..., delta: _Optional[str] = ...) -> None: ...

class Unsubscribe(_message.Message):
    __slots__ = ("channel",)
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    def __init__(self, channel: _Optional[str] = ...) -> None: ...

class Unsubscribed(_message.Message):
    __slots__ = ("channel",)
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    def __init__(self, channel: _Optional[str] = ...) -> None: ...

class Publish(_message.Message):
    __slots__ = ("channel", "data_json")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    channel: str
    data_json: str
    def __init__(self, channel: _Optional[str] = ..., data_json: _Optional[str] = ...) -> None: ...

class Published(_message.Message):
    __slots__ = ("channel", "seq", "message_id")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    channel: str
    seq: int
    message_id: str
    def __init__(self, channel: _Optional[str] = ..., seq: _Optional[int] = ..., message_id: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("timestamp",)
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    def __init__(self, timestamp: _Optional[float] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("channel", "seq", "message_id", "data_json", "timestamp", "delta", "data_delta")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DATA_DELTA_FIELD_NUMBER: _ClassVar[int]
    channel: str
    seq: int
    message_id: str
    data_json: str
    timestamp: float
    delta: bool
    data_delta: str
    def __init__(self, channel: _Optional[str] = ..., seq: _Optional[int] = ..., message_id: _Optional[str] = ..., data_json: _Optional[str] = ..., timestamp: _Optional[float] = ..., delta: _Optional[bool] = ..., data_delta: _Optional[str] = ...) -> None: ...

class Occupancy(_message.Message):
    __slots__ = ("channel", "subscribers")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBERS_FIELD_NUMBER: _ClassVar[int]
    channel: str
    subscribers: int
    def __init__(self, channel: _Optional[str] = ..., subscribers: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "channel")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    channel: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., channel: _Optional[str] = ...) -> None: ...

class Presence(_message.Message):
    __slots__ = ("channel", "members")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    channel: str
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, channel: _Optional[str] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class Join(_message.Message):
    __slots__ = ("channel", "member")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    channel: str
    member: Member
    def __init__(self, channel: _Optional[str] = ..., member: _Optional[_Union[Member, _Mapping]] = ...) -> None: ...

class Leave(_message.Message):
    __slots__ = ("channel", "member")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    channel: str
    member: Member
    def __init__(self, channel: _Optional[str] = ..., member: _Optional[_Union[Member, _Mapping]] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("user_id_str", "user_id_int", "info_json")
    USER_ID_STR_FIELD_NUMBER: _ClassVar[int]
    USER_ID_INT_FIELD_NUMBER: _ClassVar[int]
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    user_id_str: str
    user_id_int: int
    info_json: str
    def __init__(self, user_id_str: _Optional[str] = ..., user_id_int: _Optional[int] = ..., info_json: _Optional[str] = ...) -> None: ...

"""The Messages a round sends: the global model and the round's config, one per target."""

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fl_app.records import CLIENT_ID


def round_messages(message_type: str, server_round: int, arrays: ArrayRecord,
                   config: ConfigRecord, targets: list[tuple[int, int | None]],
                   extra: dict | None = None) -> list[Message]:
    """One message per (node id, client id) target, carrying the arrays and a copy of the config
    (never the caller's, which is reused every round) with the round and `extra` added. Without
    client ids every message shares one content; a pool node's message also says which client
    it serves (CLIENT_ID)."""
    sent = {**dict(config), **(extra or {}), "server-round": server_round}
    shared = RecordDict({"arrays": arrays, "config": ConfigRecord(sent)})

    def content(client_id: int | None) -> RecordDict:
        if client_id is None:
            return shared
        config_record = ConfigRecord({**sent, CLIENT_ID: client_id})
        return RecordDict({"arrays": arrays, "config": config_record})

    return [Message(content=content(client_id), dst_node_id=node_id, message_type=message_type)
            for node_id, client_id in targets]

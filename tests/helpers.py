"""Small synthetic configs so unit tests stay fast and offline."""

from __future__ import annotations

from app.config import Config, apply_overrides, build

SMALL = {
    "data": {
        "dataset": "synthetic",
        "synthetic": {"train_size": 600, "test_size": 200, "image_size": 16},
        "partition": {"kind": "iid", "num_clients": 4},
    },
    "model": {"arch": "cnn", "norm": "ws_gn", "width": 8},
    "train": {"batch_size": 32},
}


def small_config(*overrides: str) -> Config:
    """The SMALL synthetic config with ``a.b=c`` overrides applied."""
    return build(apply_overrides(SMALL, list(overrides)))


class InProcessGrid:
    """A Flower Grid that delivers each message to a ClientApp in this process: a federation
    without Ray, for fast tests of the ServerApp. Node i holds partition i; a ClientApp that
    raises gives an error reply, as in Flower's runtimes."""

    def __init__(self, client_app, num_nodes: int) -> None:
        from flwr.app import Context, RecordDict

        self.client_app = client_app
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        replies = []
        for msg in messages:
            try:
                replies.append(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as err:
                reason = f"{type(err).__name__}: {err}"
                replies.append(Message(Error(code=0, reason=reason), reply_to=msg))
        return replies


def set_task_identity(monkeypatch) -> None:
    """Messages need the identity a Flower runtime sets for its process."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)

"""The environment fl-app gives `flwr run` (and so the SuperLink and simulation it starts)."""

from fl_app.deploy.runner import RAY_INLINE_BYTES, flwr_env


def test_ray_passes_a_model_sized_message_inline_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("RAY_max_direct_call_object_size", raising=False)
    assert int(flwr_env()["RAY_max_direct_call_object_size"]) == RAY_INLINE_BYTES
    assert RAY_INLINE_BYTES > 4 * 199_210  # the 2NN's float32 weights travel inline
    monkeypatch.setenv("RAY_max_direct_call_object_size", "100")
    assert flwr_env()["RAY_max_direct_call_object_size"] == "100"
    assert flwr_env({"RAY_max_direct_call_object_size": "7"})["RAY_max_direct_call_object_size"] \
        == "7"

"""The op's Python API in every TensorFlow mode, against a real server hosting half_plus_two."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.ops import script_ops

import remote_predict
from helpers import HALF_PLUS_TWO, InProcessServer
from remote_predict.op.config import TOKEN_PREFIX, OpConfig

v1 = tf.compat.v1


@pytest.fixture(scope="module")
def leaf():
    # The op calls over gRPC even though the server runs in this process.
    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two",
                         "--remote_predict_loopback_in_process=false", rest=False) as s:
        yield s


def call(leaf, x, **kwargs):
    return remote_predict.run(["x"], [x], ["y"], target_address=leaf.address, model_name="half_plus_two",
                              output_types=[tf.float32], **kwargs)


def test_tf_internals_the_op_relies_on_are_there():
    """Fails loudly when a TensorFlow upgrade moves what pyfunc_registry.py patches."""
    assert tf.__version__.startswith("2.21."), "the op is pinned to TF 2.21; re-check pyfunc_registry.py"
    registry = script_ops._py_funcs
    assert isinstance(registry, script_ops.FuncRegistry)
    assert hasattr(registry, "_funcs") and callable(registry.get)
    assert registry.get.__name__ == "get" and registry.get.__qualname__.endswith("_install.<locals>.get")
    assert "token" in tf.raw_ops.EagerPyFunc.__doc__ or tf.raw_ops.EagerPyFunc is not None


def test_eager(leaf):
    (y,) = call(leaf, tf.constant([[2.0], [4.0]]))
    np.testing.assert_array_equal(y.numpy(), [[3.0], [4.0]])


def test_tf_function(leaf):
    @tf.function
    def f(x):
        return call(leaf, x)[0] * 2.0

    np.testing.assert_array_equal(f(tf.constant([2.0])).numpy(), [6.0])


def test_tf1_graph_and_session(leaf):
    with tf.Graph().as_default(), v1.Session() as session:
        x = v1.placeholder(tf.float32, [None])
        result = remote_predict.run_returning_status(
            ["x"], [x], ["y"], target_address=leaf.address, model_name="half_plus_two", output_types=[tf.float32])
        code, message, (y,) = session.run([result.status_code, result.status_error_message, result.output_tensors],
                                          {x: [2.0, 6.0]})
    assert code == 0 and message == b""
    np.testing.assert_array_equal(y, [3.0, 5.0])


def test_keras_layer_in_a_functional_model_saved_and_reloaded(leaf, tmp_path):
    import keras

    inputs = keras.Input(shape=(1,), dtype="float32")
    remote = remote_predict.RemotePredictLayer(leaf.address, "half_plus_two", ["x"], ["y"], ["float32"],
                                              output_shapes=[[None, 1]])
    model = keras.Model(inputs, keras.layers.Rescaling(10.0)(remote(inputs)))
    np.testing.assert_allclose(model(np.array([[2.0]], np.float32)).numpy(), [[30.0]])
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded(np.array([[4.0]], np.float32)).numpy(), [[40.0]])


def test_length_mismatches_fail_when_the_graph_is_built(leaf):
    with pytest.raises(ValueError, match="Length of 'input_tensors': 1, length of 'input_tensor_aliases': 2"):
        remote_predict.run(["x", "z"], [tf.constant(1.0)], ["y"], target_address=leaf.address,
                           model_name="half_plus_two", output_types=[tf.float32])
    with pytest.raises(ValueError, match="Length of 'output_types': 2, length of 'output_tensor_aliases': 1"):
        remote_predict.run(["x"], [tf.constant(1.0)], ["y"], target_address=leaf.address,
                           model_name="half_plus_two", output_types=[tf.float32, tf.int32])
    with pytest.raises(ValueError, match="model_name must be specified"):
        remote_predict.run(["x"], [tf.constant(1.0)], ["y"], target_address=leaf.address, model_name=None,
                           output_types=[tf.float32])


def test_runtime_alias_length_mismatch_is_a_status(leaf):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def f(aliases):  # the number of aliases is only known when the op runs
        result = remote_predict.run_returning_status(
            aliases, [tf.constant([[1.0]])], ["y"], target_address=leaf.address, model_name="half_plus_two",
            output_types=[tf.float32])
        return result.status_code, result.status_error_message

    code, message = f(tf.constant(["x", "z"]))
    assert int(code) == 3
    assert b"length of 'input_tensor_aliases': 2" in message.numpy()


def test_wrong_declared_dtype_names_the_alias(leaf):
    result = remote_predict.run_returning_status(
        ["x"], [tf.constant([[1.0]])], ["y"], target_address=leaf.address, model_name="half_plus_two",
        output_types=[tf.int32])
    assert int(result.status_code) == 13
    assert b"output 'y' has dtype float but the op declares int32" in result.status_error_message.numpy()
    assert result.output_tensors[0].shape == () and int(result.output_tensors[0]) == 0


def test_saved_model_runs_in_a_fresh_process_that_imports_remote_predict(leaf, tmp_path):
    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32)])
        def __call__(self, x):
            return {"y": call(leaf, x)[0] + 1.0}

    tf.saved_model.save(Module(), str(tmp_path / "m"))
    script = textwrap.dedent(f"""
        import remote_predict, tensorflow as tf
        m = tf.saved_model.load({str(tmp_path / "m")!r})
        print(m(tf.constant([[2.0]]))["y"].numpy().tolist())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("[[4.0]]")


@pytest.mark.parametrize("token", [
    TOKEN_PREFIX + "{not json",
    TOKEN_PREFIX + '{"target_address": "x"}',
    TOKEN_PREFIX + '{"__class__": 1}',
    TOKEN_PREFIX + OpConfig("a:1", "m", (1,)).to_token()[len(TOKEN_PREFIX):].replace('"model_version":-1',
                                                                                      '"model_version":"-1"'),
])
def test_malformed_tokens_are_refused(token):
    with pytest.raises(tf.errors.OpError, match=r"RemotePredict token|model_version must be an integer"):
        tf.raw_ops.EagerPyFunc(input=[tf.constant(["x"]), tf.constant(1.0), tf.constant(["y"])], token=token,
                               Tout=[tf.int32, tf.string, tf.float32])


def test_config_round_trips_through_its_token():
    config = OpConfig("dns:///h:1", "m", (1, 7), model_version=3, max_rpc_deadline_millis=50, signature_name="s",
                      fail_op_on_rpc_error=False)
    assert OpConfig.from_token(config.to_token()) == config

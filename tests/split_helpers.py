"""A split written by `remote-predict split` and served by real servers, for tests that compare answers."""

import numpy as np
import tensorflow as tf

from helpers import InProcessServer, free_port, write_config
from remote_predict.split import cli as split_cli


class Split:
    """A split written by the CLI, served: shard servers and a master (plus the unsplit model) in-process."""

    def __init__(self, model: str, out, shards: int, *flags: str, name: str = "rec", master_flags=()):
        self.ports = [free_port() for _ in range(shards)]
        addresses = ";".join(f"127.0.0.1:{p}" for p in self.ports)
        assert split_cli.main([model, f"--output_dir={out}", f"--shards={shards}", f"--shard_addresses={addresses}",
                               "--export_unsplit", f"--name={name}", *flags]) == 0
        self.shards = [InProcessServer(f"--model_config_file={out / 'config' / f'shard_{k}.config'}",
                                       "--file_system_poll_wait_seconds=0", f"--tcp_port={port}", rest=False)
                       for k, port in enumerate(self.ports)]
        config = write_config(out / "both.config", {name: out / "master", "unsplit": out / "unsplit"})
        self.master = InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0",
                                      "--remote_predict_loopback_in_process=false", *master_flags)
        self.name = name

    def answers(self, inputs: dict, output: str = "output_0") -> tuple[np.ndarray, np.ndarray]:
        """(the split model's answer, the unsplit model's), both from the master's server."""
        return (tf.make_ndarray(self.master.predict(self.name, inputs).outputs[output]),
                tf.make_ndarray(self.master.predict("unsplit", inputs).outputs[output]))

    def stop(self) -> None:
        for server in [self.master, *self.shards]:
            server.stop()


def shard_tables(out, shard: int, name: str = "rec") -> set[str]:
    """The tables shard `shard`'s model holds: the inputs of its `lookup` signature."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((out / "shards" / f"{name}_shard_{shard}" / "1" /
                                                   "saved_model.pb").read_bytes())
    return set(saved.meta_graphs[0].signature_def["lookup"].inputs)

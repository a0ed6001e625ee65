"""Reference executor: runs on the local device what the simulator predicts, so it can be checked."""

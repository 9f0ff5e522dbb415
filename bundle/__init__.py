"""The bundle: the only contract between the toolchain and the device (typed manifest, reader, writer, signatures).

Torch-free and numpy-free: the device reads it with the runtime install."""

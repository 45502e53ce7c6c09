#!/bin/sh
# rustc for the workspace's own crates as packagers build them (-C target-cpu=x86-64-v3, the
# last -C target-cpu wins over .cargo/config.toml's native). .ci/run passes it as
# RUSTC_WORKSPACE_WRAPPER, which cargo applies to workspace members only: the dependencies'
# metadata from the clippy step is reused instead of checked a second time with other flags.
exec "$@" -C target-cpu=x86-64-v3

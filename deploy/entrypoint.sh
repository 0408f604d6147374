#!/bin/sh
# Entrypoint of the LegoDiffusion image: runs the command it is given (the service), after
# setting LEGO_TENSOR_HOST, the address other services pull this process's tensors from, to
# this container's own IP address when it is not set. Kubernetes sets it from the pod IP;
# compose leaves it to this script, so that every replica of a scaled service (`--scale`, the
# autoscaler's compose actuator) gives its own address rather than the shared service name.
set -eu
if [ -z "${LEGO_TENSOR_HOST:-}" ]; then
    LEGO_TENSOR_HOST="$(hostname -I 2>/dev/null | cut -d' ' -f1)"
    if [ -z "$LEGO_TENSOR_HOST" ]; then
        LEGO_TENSOR_HOST="$(hostname)"
    fi
    export LEGO_TENSOR_HOST
fi
exec "$@"

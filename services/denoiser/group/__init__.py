"""Parallel groups: one denoiser replica owning k devices (k = 1, 2, 4), one request split over
them when they are idle, several requests side by side when they are busy.

How the pieces fit, leader first:

* `executor.py` — the replica's own process is rank 0 (the leader: it holds the bus, the
  requests' loops and their schedulers). On GPUs it runs device 0 too and starts k-1 follower
  processes (`follower.py`); on a CPU it only coordinates and starts k (`runtime.py` says
  why). Each follower loads the same model onto its own device; all join with
  `torch.distributed` (NCCL between GPUs, gloo on the CPU) for the collectives inside split
  calls. Each device has a lane: a FIFO of commands run one after another, so collectives over
  a sub-group are issued in the same order on all ranks.
* `split.py` — how one transformer call is cut over d devices: its rows (CFG halves, or the
  images of a batch) over r devices, each row part's image tokens over s = d / r devices
  (sequence parallelism), and how the outputs are put back together.
* `sequence.py` — sequence parallelism inside the model: attention processors that gather the
  other devices' image keys and values (the only exchange inside a layer), and the hooks that
  split the tokens after the patch embedding and gather them before the output head.
* `wire.py` — a command or a result between the leader and a follower, over a socket pair:
  a JSON header and raw tensor bytes, never a pickle.
* `device.py` — what every rank does with a command: switch LoRAs, run its part.
* `hosted.py` — a request of degree 1 on a follower's device: the follower runs its whole loop
  (the leader sends the inputs once, hears progress and the end) instead of every step making
  a round trip through the leader.
* `engine.py` — the leader's scheduler: picks each request's degree with the shared policy
  (`shared/parallel_policy.py`) at its first step, binds it to devices (a split request gives
  devices back at its next step when another request arrives, and takes them again when it
  leaves), and batches requests step by step on each set of devices as the single-device
  engine does (`batching.py`).
"""

"""NCCL collectives inside one node, as NCCL's own tuning model prices them: the fastest of its
protocols, each a base latency, a latency per ring step and the bytes at a protocol's share of
the link bandwidth (NCCL src/graph/tuning.cc has the same form).

For `op` over n GPUs and an nccl-tests size S bytes (the whole buffer: all_gather's output,
reduce_scatter's input):

    k    = 2 (n - 1) for all_reduce (a ring reduce-scatter then all-gather), n - 1 otherwise
    W    = S (k + c_steps) / n  (x (1 + int8_red_penalty) for int8 reductions)
    T_p  = alpha_p + k beta_p + (W + fill_p) / (B eff_p topo(n)),   time = min over p
    p in {LL, LL128 (NVLink only: NCCL leaves it off on PCIe), Simple}

B is the datasheet's per-direction link bandwidth (the profile's `interconnect_bytes_per_s`, both
directions, halved); alpha, beta and eff are per link kind (`interconnect`: nvlink or pcie) and
transfer between systems of that kind. c_steps is a fraction of a chunk per rank not overlapped
(bus bandwidth at 2 GPUs is ~25% below that at 8 on every system measured). Inside one node
NCCL's tree is a chain with the ring's 2(n - 1) hops, so ring and tree cannot be told apart here.
On PCIe a ring that leaves one PCIe switch (n > 2, pairs of GPUs per switch) or one CPU socket
(n > 4) crosses the host's uplinks, priced by eff_cross and eff_socket: properties of the host
platform, not of the GPU (`Param.host`). Each measured machine keeps its own; a machine never
measured takes 1, a ring at the link's rate, since one host's topology says nothing of another's
(the two PCIe machines in the data keep 0.64x and 0.07x of their 2-GPU bus bandwidth at 8 GPUs), and
the interval carries what that leaves out. Tensor parallelism's all-reduce uses this model.
"""

from __future__ import annotations

import numpy as np

from simulator.gpu_model.device import Dev
from simulator.hardware import HardwareProfile

PROTOCOLS = ("LL", "LL128", "Simple")
PCIE_GPUS_PER_SWITCH = 2  # an assumption: the common 8-GPU PCIe server pairs GPUs under a switch
PCIE_GPUS_PER_SOCKET = 4  # and splits them over two CPU sockets


def link_of(profiles: list[HardwareProfile]) -> tuple[np.ndarray, np.ndarray]:
    """(per-direction link bytes/s, link kind) of each profile."""
    bw = np.asarray([(p.interconnect_bytes_per_s or 0.0) / 2.0 for p in profiles], dtype=float)
    kind = np.asarray([p.interconnect or "pcie" for p in profiles], dtype=object)
    return bw, kind


def collective_time(P: dict, dev: Dev, op, n_gpus, nbytes, link=None, element_bytes=2.0):
    """Seconds of NCCL `op` over `n_gpus` GPUs of one node on a buffer of `nbytes` (see the
    module docstring). `link`: (per-direction bytes/s, kind) per row, from `link_of`."""
    link_bw, link_kind = link
    n = np.asarray(n_gpus, dtype=float)
    S = np.asarray(nbytes, dtype=float)
    op = np.asarray(op, dtype=object)
    n, S, op, link_bw, link_kind = np.broadcast_arrays(n, S, op, link_bw, link_kind)
    nvlink = link_kind == "nvlink"
    all_reduce = op == "all_reduce"
    reduction = all_reduce | (op == "reduce_scatter")
    k = np.where(all_reduce, 2.0 * (n - 1.0), n - 1.0)
    int8 = np.asarray(element_bytes, dtype=float) == 1.0
    wire = S * (k + P["c_steps"]) / n * np.where(reduction & int8, 1.0 + P["int8_red_penalty"], 1.0)
    topo = np.where(nvlink, 1.0, np.where(n > PCIE_GPUS_PER_SWITCH, P["eff_cross"], 1.0) * np.where(n > PCIE_GPUS_PER_SOCKET, P["eff_socket"], 1.0))
    bw = link_bw * topo
    best = np.full(n.shape, np.inf)
    for p in PROTOCOLS:
        if p == "LL128":
            alpha, beta, eff = P["alpha_nvlink_LL128"], P["beta_nvlink_LL128"], P["eff_nvlink_LL128"]
        else:
            alpha = np.where(nvlink, P[f"alpha_nvlink_{p}"], P[f"alpha_pcie_{p}"])
            beta = np.where(nvlink, P[f"beta_nvlink_{p}"], P[f"beta_pcie_{p}"])
            eff = np.where(nvlink, P[f"eff_nvlink_{p}"], P[f"eff_pcie_{p}"])
        fill = P["fill_Simple"] if p == "Simple" else 0.0
        t_us = alpha + k * beta + 1e6 * (wire + fill) / (bw * eff)
        if p == "LL128":
            t_us = np.where(nvlink, t_us, np.inf)
        best = np.minimum(best, t_us)
    return np.where(n <= 1, 0.0, best * 1e-6)

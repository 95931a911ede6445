"""Run train_sft_pg.py with a deliberately wrong gradient-slice mapping: the guard must stop it.

    torchrun --nproc_per_node 2 tests/workers/sabotage_worker.py MODE [train_sft_pg.py flags]

MODE hp_mapping (ZeRO-1/2): the mapping this project used before (DeepSpeed's per-parameter `_hp_mapping`
fragments), which is wrong under round_robin_gradients. MODE swapped (ZeRO-1/2) and fsdp2_swapped (FSDP2, launched
with an FSDP2 config): the right mapping with two parameters of equal size swapped, a wrong map whose edited memory
is still exactly what the optimizer steps with (only the check of the map itself sees it).
"""

import sys

import backends
import ogpsa_core
import train_sft_pg


class HpMappingSlice(backends.ZeroGradSlice):
    def __init__(self, zero_optimizer, params):
        super().__init__(zero_optimizer, params)
        index = {id(p): i for i, p in enumerate(params)}
        self.segments, self._owned, start = [], [], 0
        for group in zero_optimizer.bit16_groups:
            for param in group:
                if getattr(param, "_hp_mapping", None) is not None:
                    address = param._hp_mapping.lp_fragment_address
                    self.segments.append(ogpsa_core.Segment(index[id(param)], start, address.numel, address.start))
                    self._owned.append(param)
                    start += address.numel
        self.numel = start

    def pieces(self):
        views = [p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).view(-1) for p in self._owned]
        return ogpsa_core.merge_adjacent_views(views, [s.start for s in self.segments])


class SwappedSlice(backends.ZeroGradSlice):
    def __init__(self, zero_optimizer, params):
        super().__init__(zero_optimizer, params)
        whole = [i for i, s in enumerate(self.segments)
                 if s.param_start == 0 and s.length == params[s.param_index].numel()]
        first, second = next((i, j) for i in whole for j in whole if i < j
                             and self.segments[i].length == self.segments[j].length)
        a, b = self.segments[first], self.segments[second]
        self.segments[first] = ogpsa_core.Segment(b.param_index, a.start, a.length, a.param_start)
        self.segments[second] = ogpsa_core.Segment(a.param_index, b.start, b.length, b.param_start)


class Fsdp2SwappedSlice(backends.Fsdp2GradSlice):
    def __init__(self, params, param_names):
        super().__init__(params, param_names)
        first, second = next((i, j) for i, a in enumerate(self.segments) for j, b in enumerate(self.segments)
                             if i < j and a.length == b.length)
        a, b = self.segments[first], self.segments[second]
        self.segments[first] = ogpsa_core.Segment(b.param_index, a.start, a.length, a.param_start)
        self.segments[second] = ogpsa_core.Segment(a.param_index, b.start, b.length, b.param_start)


if __name__ == "__main__":
    mode = sys.argv.pop(1)
    if mode == "fsdp2_swapped":
        backends.Fsdp2GradSlice = Fsdp2SwappedSlice
    else:
        backends.ZeroGradSlice = {"hp_mapping": HpMappingSlice, "swapped": SwappedSlice}[mode]
    train_sft_pg.main()

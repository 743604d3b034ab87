"""Instruction tuning (stage sft): chat template, instruction data, packing, the loop and its evaluation."""

"""Launch training from the repository root, as the reference recipe does:

    torchrun --nproc_per_node 2 finetune.py --model_name_or_path DIR --data_path data.json \
        --use_lora true --deepspeed ds_configs/zero2.json --fp16 true --output_dir output/lora

Same arguments as `finetune train` (see README).
"""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

"""Run under `torchrun --nproc_per_node 2` (gloo): `check_data` on DATA_JSON, each rank recording the
images it decoded, its report's errors and lengths (or the error that stopped it), to
OUT_DIR/rank{RANK}.json. With IMAGE_ROOT_PREFIX, rank r resolves images under IMAGE_ROOT_PREFIX{r}.

usage: ranks_share_image_checks.py OUT_DIR DATA_JSON MODEL_DIR [IMAGE_ROOT_PREFIX]
"""

import json
import sys

import torch.distributed as dist

from finetune.data import check
from finetune.data.dataset import DataSettings, load_sample_encoder
from finetune.data.errors import DataErrors

out_dir, data_json, model_dir = sys.argv[1:4]
dist.init_process_group("gloo")
image_root = f"{sys.argv[4]}{dist.get_rank()}" if len(sys.argv) > 4 else None

decoded: list[str] = []
decodes = check.decodes


def recording_decodes(path: str) -> str | None:
    decoded.append(path)
    return decodes(path)


check.decodes = recording_decodes
encoder = load_sample_encoder(model_dir, DataSettings("2.6", 16, max_slice_nums=4, model_max_length=4096))
try:
    report = check.check_data(data_json, encoder, image_root=image_root)
    result = {"decoded": decoded, "errors": [str(e) for e in report.errors], "lengths": report.lengths}
except DataErrors as stopped:
    result = {"decoded": decoded, "stopped": str(stopped)}
with open(f"{out_dir}/rank{dist.get_rank()}.json", "w") as out:
    json.dump(result, out)
dist.destroy_process_group()

"""Is the joint FedAvg baseline at chance on WLI because of averaged BatchNorm statistics?
Re-estimate the selected joint student's BN running stats on WLI training images (no weight
change), then score the WLI test split. Usage: python -m benchmarks.joint_bn_check runs/study/default/fedavg_joint-seed0"""

import json, sys
from pathlib import Path
import numpy as np, torch
import common  # noqa: F401
from safetensors.numpy import load_file
from client.site import federation_sites
from client.train import eval_loader
from client.wire import load_numpy_state
from common.config import config_from_mapping
from common.metrics import classification_metrics
from common.models import build_student
from server.state import unflatten_blocks

run = Path(sys.argv[1])
cfg = config_from_mapping(json.loads((run / "config.json").read_text()))
blocks = unflatten_blocks(load_file(run / "state.safetensors"))
sites = [s for s in federation_sites(cfg) if s.modality == "wli"]


def score(net):
    net.eval()
    probs, labels = [], []
    with torch.no_grad():
        for site in sites:
            for x, y in eval_loader(site.test, 256):
                probs.append(torch.softmax(net(x).logits, 1).numpy())
                labels.append(y.numpy())
    return classification_metrics(np.concatenate(probs), np.concatenate(labels))["auc"]


net = build_student(cfg.model, cfg.data.num_classes, initial=False)
load_numpy_state(net, blocks[sys.argv[2] if len(sys.argv) > 2 else "best-student-student"], "student")
print("as selected (averaged BN stats):", round(score(net), 4))
for m in net.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        m.reset_running_stats()
        m.momentum = None
net.train()
with torch.no_grad():
    for site in sites:
        for x, _ in eval_loader(site.train, 24):
            net(x)
print("BN stats re-estimated on WLI train images:", round(score(net), 4))

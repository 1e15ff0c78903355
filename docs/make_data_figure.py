"""Draw one Shapes sample per task with its targets: writes docs/img/shapes_tasks.png.

    python docs/make_data_figure.py
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vlzoo.data.shapes import SKELETON, ShapesDataset  # noqa: E402
from vlzoo.structures import TASKS  # noqa: E402


def main(out: Path = Path(__file__).parent / "img" / "shapes_tasks.png") -> Path:
    fig, axes = plt.subplots(2, 4, figsize=(16, 9.4))
    for ax, task in zip(axes.flat, TASKS, strict=True):
        ds = ShapesDataset(tasks=[task], size=20, image_size=128, seed=1, num_objects=(3, 5), twin_prob=0.5, occlusion=0.3)
        s = ds[TASKS.index(task) + 2]  # a different scene per task
        ax.imshow(s.image.permute(1, 2, 0).numpy())
        t = s.targets
        if t.masks is not None:
            overlay = np.zeros((*t.masks.shape[1:], 4))
            for m in t.masks:
                overlay[m.numpy()] = (1, 1, 1, 0.55)
            ax.imshow(overlay)
        boxes = s.prompt_boxes.tolist() if task == "reg" else t.boxes.tolist()
        for x0, y0, x1, y1 in boxes:
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, ec="white" if task == "reg" else "black"))
        if t.keypoints is not None:
            for kp in t.keypoints.numpy():
                for a, b in SKELETON:
                    ax.plot(kp[[a - 1, b - 1], 0], kp[[a - 1, b - 1], 1], "k-", lw=1)
                vis = kp[:, 2] == 2
                ax.scatter(kp[vis, 0], kp[vis, 1], c="white", edgecolors="black", s=22, zorder=3)
                ax.scatter(kp[~vis, 0], kp[~vis, 1], c="grey", marker="x", s=22, zorder=3)
        answer = s.answer if s.answer is not None else f"{len(t)} target(s)"
        title = f"{task}\nQ: {s.prompt}\nA: {answer}"
        ax.set_title("\n".join(textwrap.fill(line, 42) for line in title.split("\n")), fontsize=9, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    return out


if __name__ == "__main__":
    print(main())

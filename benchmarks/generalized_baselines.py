"""Print the "always nothing" / "always everything" figures of the generalized referring metrics
on Shapes samples exported to gRefCOCO format (every object of the image as "everything") and to
ReasonSeg format with a one-pixel ignore ring (the whole image as "everything"), read back by the
readers (docs/evaluation.md, "Generalized referring (gRefCOCO) and ReasonSeg").

    OMP_NUM_THREADS=1 python benchmarks/generalized_baselines.py [--size 200] [--split val]
"""

from __future__ import annotations

import argparse
import tempfile

from vlzoo.data.export_generalized import export_shapes_grefcoco, export_shapes_reasonseg
from vlzoo.data.grefcoco import GRefCocoDataset
from vlzoo.data.reasonseg import ReasonSegDataset
from vlzoo.data.shapes import ShapesDataset
from vlzoo.evaluation.generalized import generalized_baselines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        shapes = ShapesDataset(split=args.split, size=args.size, tasks=["res"])
        p = export_shapes_grefcoco(shapes, d, phrasings=1)
        ds = GRefCocoDataset(refs_file=p["grefs"], instances_file=p["instances"], image_dir=p["image_dir"],
                             split=args.split, tasks=["res"])
        samples = [ds[i] for i in range(len(ds))]
        grefcoco = generalized_baselines(samples, image_objects=[ds.image_objects(i) for i in range(len(ds))])
        r = export_shapes_reasonseg(shapes, f"{d}/reasonseg", phrasings=1, ignore_margin=1)
        reason = ReasonSegDataset(data_dir=r["root"], split=args.split)
        reasonseg = generalized_baselines([reason[i] for i in range(len(reason))])
    for title, out in (("gRefCOCO format", grefcoco), ("ReasonSeg format, 1 px ignore ring", reasonseg)):
        for name, figures in out.items():
            print(f"{title}: {name}")
            for key, value in figures.items():
                print(f"  {key:22s} {value:.4f}")


if __name__ == "__main__":
    main()

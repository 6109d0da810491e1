"""The drawing of a derived network: any genotype (shared or per-cell ops, 2..many cells) gives a
PNG whose size grows with the number of cells; the caption counts match the network's."""
import random

from PIL import Image

from hdnas.engine.drawing import draw_genotype
from hdnas.model.genotype import NAMED, Genotype
from hdnas.model.space import DLSR_PRIMITIVES


def test_released_and_random_genotypes_draw(tmp_path):
    for name, g in NAMED.items():
        p = draw_genotype(g, tmp_path / f"{name}.png")
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 800 and im.height > 300
    rng = random.Random(0)
    sizes = {}
    for cells in (2, 3, 9):
        rows = tuple(tuple(rng.choice(DLSR_PRIMITIVES) for _ in range(3)) for _ in range(cells))
        inputs = tuple(tuple(sorted(rng.sample(range(i), 2))) for i in range(2, cells))
        g = Genotype(rows, inputs, channels=8, scale=3, num_cells=cells, name=f"random{cells}")
        with Image.open(draw_genotype(g, tmp_path / f"r{cells}.png")) as im:
            sizes[cells] = im.width
    assert sizes[2] <= sizes[3] < sizes[9]

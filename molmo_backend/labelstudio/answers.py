"""Turn one Molmo answer into the regions of the controls its :class:`~molmo_backend.labelstudio.asks.Ask`
fills: scored keypoints (weak ones and ones on top of the annotator's own dropped), a <Number>'s
count, a <TextArea>'s text."""

from __future__ import annotations

import math

from molmo_backend.engine.base import Answer
from molmo_backend.labelstudio.asks import Ask
from molmo_backend.labelstudio.regions import keypoint_region, number_region, textarea_region
from molmo_backend.pointing.confidence import scored_points
from molmo_backend.pointing.points import parse_count

#: a suggested point closer than this (in percent of the image, x and y) to a point the annotator
#: placed is taken to be that same point and dropped
PLACED_RADIUS = 2.0


def answer_regions(
    ask: Ask,
    answer: Answer,
    *,
    image_width: int,
    image_height: int,
    point_width: float,
    min_point_score: float = 0.0,
) -> list[dict]:
    """The regions this answer gives. Points without any score are kept whatever the threshold
    (there is nothing to compare); see docs/confidence.md."""
    regions: list[dict] = []
    if ask.keypoints is not None and ask.label is not None:
        for scored in scored_points(answer):
            if scored.score is not None and scored.score < min_point_score:
                continue
            if any(
                math.dist((scored.point.x, scored.point.y), placed) < PLACED_RADIUS for placed in ask.placed
            ):
                continue
            region = keypoint_region(
                scored.point,
                from_name=ask.keypoints.from_name,
                to_name=ask.keypoints.to_name,
                label=ask.label,
                image_width=image_width,
                image_height=image_height,
                point_width=point_width,
                score=scored.score,
            )
            if region is not None:
                regions.append(region)
    if ask.count is not None:
        count = parse_count(answer.text)
        region = (
            None
            if count is None
            else number_region(from_name=ask.count.from_name, to_name=ask.count.to_name, number=count)
        )
        if region is not None:
            regions.append(region)
    if ask.text is not None:
        region = textarea_region(from_name=ask.text.from_name, to_name=ask.text.to_name, text=answer.text)
        if region is not None:
            regions.append(region)
    return regions

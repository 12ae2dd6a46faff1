"""The one format of reader-study reads: what the database exports, the simulator writes and the analysis reads.

Two tables:

- **reads** (one row per reader x case x modality), columns `READ_COLUMNS`. `rating` is the reader's malignancy
  confidence on the study's scale (higher = more likely malignant); `diagnosis` and `truth` are class names of
  the study's label set; `modality` is `unaided` or `aided`; `ai_*` is what the AI showed for that case (same
  value in both modalities; the reader saw it only when aided).
- **cases** (one row per case), columns `CASE_COLUMNS`: truth and the AI's answer, so the model's own ROC can be
  drawn for the same cases.

The long format MRMC software reads (`MRMC_COLUMNS`: reader, modality, case, truth, rating) is derived from reads
for one task (melanoma or malignancy): truth there is 0/1.
"""

from __future__ import annotations

MODALITIES: tuple[str, ...] = ("unaided", "aided")
MANAGEMENT: tuple[str, ...] = ("excise", "follow-up", "reassure")
LEVELS: tuple[str, ...] = ("resident", "board-certified", "expert")
TASKS: tuple[str, ...] = ("melanoma", "malignancy")

READ_COLUMNS: tuple[str, ...] = (
    "reader",          # reader id (string)
    "reader_level",    # one of LEVELS (or free text)
    "reader_years",    # years of experience (float)
    "modality",        # unaided | aided
    "phase",           # 1 or 2 (order in which the reader saw this modality)
    "case",            # case id (string)
    "truth",           # true class name
    "diagnosis",       # reader's class name
    "rating",          # malignancy confidence (number on the study's scale)
    "management",      # one of MANAGEMENT
    "seconds",         # time spent on the case (float)
    "ai_top",          # AI's shown class (empty when the AI refused the image)
    "ai_mel_prob",     # AI's calibrated melanoma probability (NaN when refused)
    "ai_malignant_prob",  # AI's probability of any malignant class (NaN when refused)
    "ai_melanoma_flag",   # AI's melanoma flag at the bundle's threshold (bool)
)
CASE_COLUMNS: tuple[str, ...] = ("case", "image_id", "truth", "ai_top", "ai_mel_prob", "ai_malignant_prob",
                                 "ai_melanoma_flag")
MRMC_COLUMNS: tuple[str, ...] = ("reader", "modality", "case", "truth", "rating")

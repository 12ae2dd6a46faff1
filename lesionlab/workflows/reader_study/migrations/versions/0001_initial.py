"""Initial reader-study schema: admins, studies, cases, readers, openings, reads.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reader_admins",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "reader_studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("scale", sa.String(16), nullable=False),
        sa.Column("washout_days", sa.Float(), nullable=False),
        sa.Column("crossover", sa.Boolean(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("aided", sa.Boolean(), nullable=False),
        sa.Column("bundle", sa.JSON(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
    )
    op.create_table(
        "reader_cases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("reader_studies.id", ondelete="CASCADE"), nullable=False),
        sa.Column("key", sa.String(32), nullable=False),
        sa.Column("image_id", sa.String(200), nullable=False),
        sa.Column("truth", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("image", sa.LargeBinary(), nullable=False),
        sa.Column("image_type", sa.String(32), nullable=False),
        sa.Column("ai", sa.JSON(), nullable=True),
        sa.Column("ai_top", sa.String(32), nullable=False),
        sa.Column("ai_mel_prob", sa.Float(), nullable=True),
        sa.Column("ai_malignant_prob", sa.Float(), nullable=True),
        sa.Column("ai_melanoma_flag", sa.Boolean(), nullable=False),
        sa.UniqueConstraint("study_id", "key", name="uq_reader_cases_key"),
        sa.UniqueConstraint("study_id", "image_id", name="uq_reader_cases_image"),
    )
    op.create_index("ix_reader_cases_study_id", "reader_cases", ["study_id"])
    op.create_table(
        "reader_readers",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("reader_studies.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("level", sa.String(64), nullable=True),
        sa.Column("years", sa.Float(), nullable=True),
        sa.Column("first_modality", sa.String(16), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("phase1_done_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("study_id", "name", name="uq_reader_readers_name"),
    )
    op.create_index("ix_reader_readers_study_id", "reader_readers", ["study_id"])
    op.create_table(
        "reader_openings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("reader_id", sa.Integer(), sa.ForeignKey("reader_readers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("case_id", sa.Integer(), sa.ForeignKey("reader_cases.id", ondelete="CASCADE"), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("first_at", sa.DateTime(), nullable=False),
        sa.Column("last_at", sa.DateTime(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.UniqueConstraint("reader_id", "case_id", "modality", name="uq_reader_openings"),
    )
    op.create_index("ix_reader_openings_reader_id", "reader_openings", ["reader_id"])
    op.create_table(
        "reader_reads",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("reader_id", sa.Integer(), sa.ForeignKey("reader_readers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("case_id", sa.Integer(), sa.ForeignKey("reader_cases.id", ondelete="CASCADE"), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("diagnosis", sa.String(32), nullable=False),
        sa.Column("rating", sa.Float(), nullable=False),
        sa.Column("management", sa.String(32), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("openings", sa.Integer(), nullable=False),
        sa.Column("submitted_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("reader_id", "case_id", "modality", name="uq_reader_reads"),
    )
    op.create_index("ix_reader_reads_reader_id", "reader_reads", ["reader_id"])


def downgrade() -> None:
    for name in ("reader_reads", "reader_openings", "reader_readers", "reader_cases", "reader_studies", "reader_admins"):
        op.drop_table(name)

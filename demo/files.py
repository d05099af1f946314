"""Files the demo's runs produce (the report PDF), kept in the app's database as long as their run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sqlalchemy import Column, DateTime, LargeBinary, MetaData, String, Table, delete, select
from sqlalchemy.orm import Session

from common.database import Database, create_tables, database_call, upsert, utcnow, write_session

metadata = MetaData()

files = Table(
    "report_files",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("name", String(100), primary_key=True),
    Column("content_type", String(100), nullable=False),
    Column("content", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class StoredFile:
    run_id: str
    name: str
    content_type: str
    content: bytes


class FileStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.engine = db.engine
        db.add_schema(lambda engine: create_tables(engine, metadata))

    @database_call
    def save(self, run_id: str, name: str, content_type: str, content: bytes) -> None:
        """Store (or replace) a file produced by a run."""
        statement = upsert(self.engine, files).values(
            run_id=run_id, name=name, content_type=content_type, content=content, created_at=utcnow()
        )
        with write_session(self.engine) as session:
            session.execute(statement.on_conflict_do_update(
                index_elements=[files.c.run_id, files.c.name],
                set_={"content_type": statement.excluded.content_type, "content": statement.excluded.content},
            ))

    @database_call
    def load(self, run_id: str, name: str) -> StoredFile | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(files).where(files.c.run_id == run_id, files.c.name == name)).first()
        return None if row is None else StoredFile(row.run_id, row.name, row.content_type, bytes(row.content))

    def delete_for_runs(self, session: Session, run_ids: Sequence[str]) -> None:
        """Delete the files of these runs, in `session`'s transaction: the one deleting the runs
        (`Jobs.on_prune`), so a file never outlives its run nor goes before it."""
        session.execute(delete(files).where(files.c.run_id.in_(run_ids)))

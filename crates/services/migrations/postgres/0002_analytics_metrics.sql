-- Analytics' metrics and the events it has consumed, in the same schema as users and
-- orders: one migrator per database, so every service's tables are in one sequence.
CREATE TABLE metrics (
    id           BIGINT           GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type         TEXT             NOT NULL,
    value        DOUBLE PRECISION NOT NULL,
    timestamp    TEXT             NOT NULL,
    timestamp_ms BIGINT           NOT NULL,
    received_ms  BIGINT           NOT NULL
);
CREATE INDEX metrics_by_type ON metrics (type);

-- Events consumed (by id), written in the transaction of their effect.
CREATE TABLE processed_events (
    id          TEXT   PRIMARY KEY,
    type        TEXT   NOT NULL,
    received_ms BIGINT NOT NULL
);

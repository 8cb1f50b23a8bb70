-- The model registry: every trained run-time model, its holdout metrics and which one
-- is active (at most one). Predictors load the active model; operators roll back with
-- `mlsched model activate VERSION`.

CREATE TABLE models (
    version          bigserial   PRIMARY KEY,
    algorithm        text        NOT NULL,
    features         jsonb       NOT NULL,
    trained_at       timestamptz NOT NULL DEFAULT now(),
    samples          integer     NOT NULL,
    holdout_mae_ms   double precision NOT NULL,
    holdout_r2       double precision NOT NULL,
    baseline_mae_ms  double precision NOT NULL,
    model            bytea       NOT NULL,
    active           boolean     NOT NULL DEFAULT false
);

CREATE UNIQUE INDEX models_one_active ON models (active) WHERE active;

-- History for training: finished jobs by time.
CREATE INDEX jobs_succeeded_finished_idx ON jobs (finished_at) WHERE status = 'succeeded';

-- Dead letters: dead_at is when the consumer refused an event for good (a permanent
-- 4xx), last_error what it answered. A dead row is never claimed again and never
-- pruned, so an operator can see it. Older rows have neither.
ALTER TABLE outbox ADD COLUMN dead_at BIGINT NULL;
ALTER TABLE outbox ADD COLUMN last_error TEXT NULL;

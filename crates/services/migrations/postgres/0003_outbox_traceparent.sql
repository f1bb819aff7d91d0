-- The W3C traceparent of the request that caused each event, so its consumer continues
-- that trace. Rows written before, or outside any request, have none.
ALTER TABLE outbox ADD COLUMN traceparent TEXT NULL;

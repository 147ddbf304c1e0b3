-- Offline delivery: push devices, unread counts, the message archive and the
-- notifier's dead letters.

-- A phone or browser that gets pushes. A token belongs to one user at a time:
-- registering it again (another user logged in on the phone) moves it.
CREATE TABLE IF NOT EXISTS devices (
    platform    text NOT NULL CHECK (platform IN ('apns', 'fcm')),
    token       text NOT NULL CHECK (length(token) BETWEEN 1 AND 4096),
    user_id     text NOT NULL CHECK (user_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    topic       text CHECK (topic IS NULL OR length(topic) BETWEEN 1 AND 255),
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_ok     timestamptz,
    PRIMARY KEY (platform, token)
);
CREATE INDEX IF NOT EXISTS devices_by_user ON devices (user_id);

-- Unread messages, one row per (user, room, seq) counted: the notifier inserts
-- with ON CONFLICT DO NOTHING, so a redelivered message never counts twice and
-- replicas may work out of order. A room's unread count is the number of rows
-- above the member's last_read_seq; marking read deletes the rows at or below.
CREATE TABLE IF NOT EXISTS unread (
    user_id  text NOT NULL,
    room_id  text NOT NULL,
    seq      bigint NOT NULL,
    PRIMARY KEY (user_id, room_id, seq),
    FOREIGN KEY (room_id, user_id) REFERENCES room_members (room_id, user_id) ON DELETE CASCADE
);

-- Every message, copied from the CHAT stream by the archiver (idempotent on
-- room + seq); history reads it for what the stream no longer keeps.
CREATE TABLE IF NOT EXISTS messages (
    room_id     text NOT NULL,
    seq         bigint NOT NULL,
    id          text NOT NULL,
    sender      text NOT NULL,
    ts          bigint NOT NULL,
    body        text NOT NULL,
    kind        text NOT NULL,
    attachment  text,
    PRIMARY KEY (room_id, seq)
);

-- Messages a consumer gave up on (unreadable, or failing after the maximum
-- number of deliveries), so that one poison message cannot stall the rest.
CREATE TABLE IF NOT EXISTS dead_letters (
    consumer    text NOT NULL,
    stream_seq  bigint NOT NULL,
    subject     text NOT NULL,
    payload     bytea NOT NULL,
    deliveries  bigint NOT NULL,
    error       text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, stream_seq)
);

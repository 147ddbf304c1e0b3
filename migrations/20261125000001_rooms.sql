-- Rooms and their members. The durable log of messages lives in the CHAT
-- stream (and, from the notifier's archive on, in `messages`); PostgreSQL holds
-- who may read and write a room and how far each member has read.
CREATE TABLE IF NOT EXISTS rooms (
    id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    name        text NOT NULL,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS room_members (
    room_id        text NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id        text NOT NULL CHECK (user_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    role           text NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'member')),
    muted          boolean NOT NULL DEFAULT false,
    last_read_seq  bigint NOT NULL DEFAULT 0 CHECK (last_read_seq >= 0),
    joined_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, user_id)
);

CREATE INDEX IF NOT EXISTS room_members_by_user ON room_members (user_id);

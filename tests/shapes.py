"""Application schemas that tests add to the legacy schema, or build a database from."""

UPDATED_AT = """
ALTER TABLE users ADD COLUMN updated_at timestamptz NOT NULL DEFAULT '2000-01-01';
CREATE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END$$;
CREATE TRIGGER users_updated_at BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
"""

# Ids in several spellings (upper case, braces), so that the rollback's exact
# restore of each original string is proven, not only its value.
_SPELLED = ("CASE mod(i, 3) WHEN 0 THEN upper(u::text) WHEN 1 THEN '{' || u || '}' "
            "ELSE u::text END")

ACCOUNTS = f"""
CREATE SCHEMA app;
CREATE SCHEMA audit;
CREATE TABLE app.accounts (uuid text PRIMARY KEY, name text NOT NULL);
CREATE TABLE app.sessions (
    id serial PRIMARY KEY,
    account_uuid varchar(64) NOT NULL REFERENCES app.accounts (uuid),
    token text NOT NULL);
CREATE INDEX sessions_account ON app.sessions (account_uuid);
CREATE TABLE audit.events (
    id bigserial PRIMARY KEY,
    account text REFERENCES app.accounts (uuid) ON DELETE SET NULL,
    what text NOT NULL);
INSERT INTO app.accounts
    SELECT {_SPELLED}, 'account ' || i
    FROM (SELECT i, gen_random_uuid() AS u FROM generate_series(1, 120) i) s;
INSERT INTO app.sessions (account_uuid, token)
    SELECT uuid, 'token ' || n FROM app.accounts, generate_series(1, 2) n;
INSERT INTO audit.events (account, what)
    SELECT CASE WHEN n = 3 THEN NULL ELSE uuid END, 'login' FROM app.accounts,
           generate_series(1, 3) n;
"""

KEYCLOAK = f"""
CREATE TABLE public.user_entity (
    id varchar(36) PRIMARY KEY, username varchar(255) NOT NULL UNIQUE);
CREATE TABLE public.keycloak_role (id varchar(36) PRIMARY KEY, name varchar(255) NOT NULL);
CREATE TABLE public.user_role_mapping (
    role_id varchar(255) NOT NULL REFERENCES public.keycloak_role (id),
    user_id varchar(36) NOT NULL REFERENCES public.user_entity (id),
    PRIMARY KEY (role_id, user_id));
INSERT INTO public.user_entity
    SELECT {_SPELLED.replace("'{' || u || '}'", "upper(u::text)")}, 'user' || i
    FROM (SELECT i, gen_random_uuid() AS u FROM generate_series(1, 100) i) s;
INSERT INTO public.keycloak_role
    SELECT gen_random_uuid(), 'role ' || i FROM generate_series(1, 3) i;
INSERT INTO public.user_role_mapping SELECT r.id, u.id FROM public.keycloak_role r,
    public.user_entity u WHERE mod(length(u.username), 2) = 0 OR r.name = 'role 1';
"""

# Tables without a primary key (tests/test_no_primary_key.py).
NO_PRIMARY_KEY = """
CREATE TABLE user_roles (user_id varchar(36) NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                         role text NOT NULL);
CREATE TABLE user_devices (user_id varchar(36) REFERENCES users(id), device text NOT NULL,
                           UNIQUE (device));
"""
# Users with upper-case ids (their children spell them so too), then four roles for
# every user, each role of an upper-case user twice (identical rows, no key to tell
# them apart), and a device per user, one in five without a user.
NO_PRIMARY_KEY_ROWS = """
INSERT INTO users (id, email) SELECT upper(gen_random_uuid()::text), 'upper' || g || '@example.com'
FROM generate_series(1, 20) g;
INSERT INTO user_roles (user_id, role)
SELECT u.id, r FROM users u, unnest(ARRAY['reader', 'writer', 'owner', 'admin']) r,
       generate_series(1, CASE WHEN u.id <> lower(u.id) THEN 2 ELSE 1 END);
INSERT INTO user_devices (user_id, device)
SELECT CASE WHEN mod(row_number() OVER (), 5) = 0 THEN NULL ELSE u.id END, 'device-' || u.email
FROM users u;
ANALYZE user_roles; ANALYZE user_devices;
"""

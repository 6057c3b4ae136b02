"""The hub's tables (SQLAlchemy Core). Alembic migrations create them; nothing else does.

Times are UNIX seconds (double precision): every comparison the hub makes is against
`time.time()` and token claims are seconds, so no time-zone conversion sits on a hot path.
Secrets never land here in the clear: client secrets, codes and refresh tokens are stored as
SHA-256 digests of 256-bit random values (a slow hash adds nothing against guessing 2^256, and
would cost the client-credentials grant its throughput; see ADR 0007).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("display_name", String(128), nullable=False),
    Column("email", String(254), nullable=True),
    Column("phone", String(32), nullable=True),
    Column("locale", String(8), nullable=True),
    Column("password_hash", String(256), nullable=True),
    Column("totp_secret", String(64), nullable=True),
    Column("totp_last_step", BigInteger, nullable=True),
    # Real-name verification (GB 11643 resident ID matched by an authority): the name, the masked
    # number for display, and an HMAC fingerprint so one identity links to one account only.
    Column("real_name", String(128), nullable=True),
    Column("resident_id_masked", String(32), nullable=True),
    Column("resident_fingerprint", String(64), nullable=True, unique=True),
    Column("real_name_verified_at", Float, nullable=True),
    Column("created_at", Float, nullable=False),
)

organizations = Table(
    "organizations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
)

memberships = Table(
    "memberships",
    metadata,
    Column(
        "org_id", String(64), ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    ),
    Column(
        "account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("roles", JSON, nullable=False),
)

passkeys = Table(
    "passkeys",
    metadata,
    Column("credential_id", LargeBinary(1024), primary_key=True),
    Column(
        "account_id",
        String(40),
        ForeignKey("accounts.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("record", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)

clients = Table(
    "clients",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("secret_digest", String(64), nullable=True),
    Column("spec", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Browser sessions at the hub. `state` holds what the session verified (method + time) and the
# authorization requests in progress; the cookie carries only the random id.
sessions = Table(
    "sessions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column(
        "account_id",
        String(40),
        ForeignKey("accounts.id", ondelete="CASCADE"),
        nullable=True,
        index=True,
    ),
    Column("state", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("seen_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False, index=True),
    Column("user_agent", String(256), nullable=True),
    Column("ip", String(64), nullable=True),
)

authorization_codes = Table(
    "authorization_codes",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("client_id", String(64), nullable=False),
    Column("account_id", String(40), nullable=False),
    Column("session_id", String(64), nullable=True),
    Column("redirect_uri", Text, nullable=False),
    Column("scope", Text, nullable=False),
    Column("nonce", String(256), nullable=True),
    Column("code_challenge", String(128), nullable=True),
    Column("code_challenge_method", String(8), nullable=True),
    Column("auth", JSON, nullable=False),  # acr, amr, auth_time, org
    Column("expires_at", Float, nullable=False),
    Column("used", Boolean, nullable=False, default=False),
)

# Refresh tokens rotate on every use; all tokens of one login share a `family`. Presenting a used
# token again revokes the whole family (RFC 9700 §4.14.2: reuse detection).
refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("family", String(64), nullable=False, index=True),
    Column("client_id", String(64), nullable=False),
    Column("account_id", String(40), nullable=True, index=True),
    Column("session_id", String(64), nullable=True),
    Column("scope", Text, nullable=False),
    Column("auth", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float, nullable=True),
    Column("revoked", Boolean, nullable=False, default=False),
)

# Access tokens are JWTs validated locally; only revoked ones are remembered (until they expire)
# so introspection can say `active: false` for them.
revoked_jtis = Table(
    "revoked_jtis",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("expires_at", Float, nullable=False),
)

consents = Table(
    "consents",
    metadata,
    Column(
        "account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("client_id", String(64), primary_key=True),
    Column("scopes", JSON, nullable=False),
    Column("granted_at", Float, nullable=False),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(8), nullable=False),
    Column("private_pem", Text, nullable=False),
    Column("public_jwk", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    # Published from `created_at`; signs from `active_from`; stops signing at `retire_at`;
    # leaves the JWKS at `expire_at` (after the last token it signed has expired).
    Column("active_from", Float, nullable=False),
    Column("retire_at", Float, nullable=True),
    Column("expire_at", Float, nullable=True),
)

# Append-only, each entry hash-chained to the one before (identity/audit_chain.py).
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("action", String(64), nullable=False),
    Column("actor", String(128), nullable=True),
    Column("subject", String(40), nullable=True),
    Column("client_id", String(64), nullable=True),
    Column("ip", String(64), nullable=True),
    Column("detail", JSON, nullable=False),
    Column("hash", String(64), nullable=False),
    Index("audit_subject_at", "subject", "at"),
)

# Accounts signed in through an upstream provider: one (issuer, subject) -> one local account.
federated_identities = Table(
    "federated_identities",
    metadata,
    Column("issuer", String(255), primary_key=True),
    Column("subject", String(255), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", Float, nullable=False),
)

/*
 * psyche_run: the on-chain half of the Solana ledger host.
 *
 * The coordinator itself is NOT here: it stays one Python state machine that
 * every participant replays from this program's confirmed transactions.  The
 * program only makes that history trustworthy and complete:
 *
 *   - CREATE_RUN creates the run account at the address derived from the run id
 *     (a program-derived address, seeds "run" | sha256(run_id) | bump, the hash
 *     computed here so the address is bound to the id), owned by this program,
 *     and records the creator as the run's authority.
 *   - SUBMIT accepts one coordinator instruction (opaque bytes) for a run when the
 *     envelope is well formed, names the run account it is sent with, and the
 *     participant signed the transaction.
 *
 * Every accepted entry (create-run included) bumps the run's entry counter and
 * extends a hash chain  chain' = sha256(chain | count | signer | payload).  The
 * new (count, chain) is returned as the transaction's return data, so a replayer
 * orders entries by count, detects a missing or altered one, and checks it got
 * everything by comparing with the run account.  Whether the coordinator accepts
 * an entry is decided by the replay, identically for everyone.
 *
 * Built with Debian's clang for the upstream bpfel target (see build.sh), so it
 * avoids what that target and the Solana VM disagree on: no global data, no
 * library calls (memcpy & co), no jump tables, only inlined helpers.
 *
 * Envelope (instruction data, little endian):
 *   0..4   magic "PSY" + version 1
 *   4      kind: 0 = CREATE_RUN, 1 = SUBMIT
 *   5..37  the run account's address
 *   37..   CREATE_RUN: run_id length n (1..64) | run_id (n) | bump (1) | lamports u64 | payload
 *          SUBMIT:     payload (the coordinator instruction's compact encoding)
 *
 * Accounts: SUBMIT [participant (signer), run (writable)];
 *           CREATE_RUN [creator (signer, writable, pays), run (writable), system program].
 * Only top-level instructions are accepted (no cross-program invocation), so every
 * recorded entry is visible in its transaction's message.
 */
#include <stdint.h>

typedef struct { const uint8_t *addr; uint64_t len; } Bytes;            /* SolBytes / SolSignerSeed */
typedef struct { const Bytes *addr; uint64_t len; } Seeds;              /* SolSignerSeeds */
typedef struct { const uint8_t *pubkey; uint8_t is_writable; uint8_t is_signer; } AccountMeta;
typedef struct {
    const uint8_t *program_id; const AccountMeta *accounts; uint64_t account_len;
    const uint8_t *data; uint64_t data_len;
} Instruction;
typedef struct {
    const uint8_t *key; uint64_t *lamports; uint64_t data_len; uint8_t *data;
    const uint8_t *owner; uint64_t rent_epoch;
    uint8_t is_signer; uint8_t is_writable; uint8_t executable;
} AccountInfo;

/* Solana syscalls, resolved by name when the program is loaded. */
extern uint64_t sol_sha256(const Bytes *vals, uint64_t n, uint8_t *out);
extern void sol_set_return_data(const uint8_t *data, uint64_t len);
extern uint64_t sol_create_program_address(const Bytes *seeds, uint64_t n, const uint8_t *program_id, uint8_t *out);
extern uint64_t sol_get_stack_height(void);
extern uint64_t sol_invoke_signed_c(const Instruction *ix, const AccountInfo *infos, uint64_t n_infos,
                                    const Seeds *signers, uint64_t n_signers);

/* Custom error codes: the transaction fails with InstructionError::Custom(code). */
#define E_ACCOUNTS       1   /* too few accounts, or a duplicated one */
#define E_NOT_SIGNER     2   /* the participant did not sign */
#define E_SHORT          3   /* instruction data shorter than its envelope */
#define E_MAGIC          4   /* not "PSY" version 1 */
#define E_KIND           5   /* unknown kind */
#define E_RUN_MISMATCH   6   /* envelope names another run account */
#define E_NOT_RUN        7   /* run account not owned by us, not writable or not initialised */
#define E_BAD_ADDRESS    8   /* CREATE_RUN: address is not derived from the run id */
#define E_SYSTEM         9   /* CREATE_RUN: third account is not the system program */
#define E_CREATE        10   /* CREATE_RUN: the system program refused to create the account */
#define E_RUN_ID        11   /* CREATE_RUN: run id empty, longer than 64 bytes, or data too short */
#define E_NESTED        12   /* invoked by another program: entries must be top-level instructions */

#define ENVELOPE 37
#define MAX_DATA_INCREASE 10240
/* Run account layout: magic | sha256(run_id) | authority | count | chain. */
#define RUN_MAGIC 0x3130534e55525950ULL   /* "PYRUNS01" little endian */
#define RUN_SIZE 112

#define INLINE static inline __attribute__((always_inline))

INLINE uint64_t load_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
INLINE void store_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) { p[i] = (uint8_t)v; v >>= 8; }
}
INLINE int eq32(const uint8_t *a, const uint8_t *b) {
    uint8_t diff = 0;
    for (int i = 0; i < 32; i++) diff |= a[i] ^ b[i];
    return diff == 0;
}
INLINE void copy(uint8_t *dst, const uint8_t *src, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) dst[i] = src[i];
}

/* One serialized (non-duplicate) account of the entrypoint's input. */
typedef struct { uint8_t *base; uint64_t data_len; } Acc;
#define A_SIGNER(a)   ((a).base[1])
#define A_WRITABLE(a) ((a).base[2])
#define A_KEY(a)      ((a).base + 8)
#define A_OWNER(a)    ((a).base + 40)
#define A_LAMPORTS(a) ((uint64_t *)((a).base + 72))
#define A_DATA(a)     ((a).base + 88)

/* Append (signer, payload) to the run's chain; return (count, chain) as return data. */
static __attribute__((noinline)) void record(uint8_t *run, const uint8_t *signer, const uint8_t *payload, uint64_t payload_len) {
    uint8_t out[40];
    uint64_t count = load_u64(run + 72) + 1;
    store_u64(out, count);
    Bytes parts[4] = {{run + 80, 32}, {out, 8}, {signer, 32}, {payload, payload_len}};
    sol_sha256(parts, 4, out + 8);
    store_u64(run + 72, count);
    copy(run + 80, out + 8, 32);
    sol_set_return_data(out, 40);
}

static __attribute__((noinline)) uint64_t create_run(Acc *acc, const uint8_t *data, uint64_t data_len,
                                                     const uint8_t *program_id);

uint64_t entrypoint(uint8_t *input) {
    uint64_t n_accounts = *(uint64_t *)input;
    uint8_t *p = input + 8;
    Acc acc[3];
    uint64_t seen = 0;
    /* Walk the serialized accounts (we need at most three) to find the instruction data. */
    for (uint64_t i = 0; i < n_accounts; i++) {
        if (p[0] != 0xff) {            /* a duplicate: 8 bytes */
            if (i < 3) return E_ACCOUNTS;
            p += 8;
            continue;
        }
        uint64_t len = *(uint64_t *)(p + 80);
        if (i < 3) { acc[i].base = p; acc[i].data_len = len; seen = i + 1; }
        p += 88 + len + MAX_DATA_INCREASE;
        p += (8 - ((uint64_t)p & 7)) & 7;   /* realign to 8 (the buffer itself is 8-aligned) */
        p += 8;                              /* rent epoch */
    }
    uint64_t data_len = *(uint64_t *)p;
    const uint8_t *data = p + 8;
    const uint8_t *program_id = data + data_len;

    if (sol_get_stack_height() != 1) return E_NESTED;
    if (seen < 2) return E_ACCOUNTS;
    if (!A_SIGNER(acc[0])) return E_NOT_SIGNER;
    if (data_len < ENVELOPE) return E_SHORT;
    if (data[0] != 'P' || data[1] != 'S' || data[2] != 'Y' || data[3] != 1) return E_MAGIC;
    uint8_t kind = data[4];
    if (kind > 1) return E_KIND;
    if (!eq32(data + 5, A_KEY(acc[1]))) return E_RUN_MISMATCH;
    if (!A_WRITABLE(acc[1])) return E_NOT_RUN;

    if (kind == 1) {                                   /* SUBMIT */
        uint8_t *run = A_DATA(acc[1]);
        if (!eq32(A_OWNER(acc[1]), program_id) || acc[1].data_len < RUN_SIZE || load_u64(run) != RUN_MAGIC)
            return E_NOT_RUN;
        record(run, A_KEY(acc[0]), data + ENVELOPE, data_len - ENVELOPE);
        return 0;
    }

    if (seen < 3) return E_ACCOUNTS;
    return create_run(acc, data, data_len, program_id);
}

/* system_program::create_account(creator -> run, lamports, RUN_SIZE, owner = us), the run
 * address signing through its seeds. Own stack frame: the CPI structures are large. */
static __attribute__((noinline)) uint64_t create_account(Acc *acc, uint64_t lamports, const uint8_t *program_id,
                                                         const Bytes *seeds) {
    uint8_t ix_data[52];
    for (int i = 0; i < 4; i++) ix_data[i] = 0;
    store_u64(ix_data + 4, lamports);
    store_u64(ix_data + 12, RUN_SIZE);
    copy(ix_data + 20, program_id, 32);
    AccountMeta metas[2] = {{A_KEY(acc[0]), 1, 1}, {A_KEY(acc[1]), 1, 1}};
    Instruction ix = {A_KEY(acc[2]), metas, 2, ix_data, 52};
    AccountInfo infos[3];
    for (int i = 0; i < 3; i++) {
        infos[i].key = A_KEY(acc[i]);
        infos[i].lamports = A_LAMPORTS(acc[i]);
        infos[i].data_len = acc[i].data_len;
        infos[i].data = A_DATA(acc[i]);
        infos[i].owner = A_OWNER(acc[i]);
        infos[i].rent_epoch = 0;
        infos[i].is_signer = A_SIGNER(acc[i]);
        infos[i].is_writable = A_WRITABLE(acc[i]);
        infos[i].executable = acc[i].base[3];
    }
    Seeds signer = {seeds, 3};
    return sol_invoke_signed_c(&ix, infos, 3, &signer, 1);
}

/* CREATE_RUN, in its own stack frame (the bpfel target allows 512 bytes per frame). */
static __attribute__((noinline)) uint64_t create_run(Acc *acc, const uint8_t *data, uint64_t data_len,
                                                     const uint8_t *program_id) {
    for (int i = 0; i < 32; i++) if (A_KEY(acc[2])[i] != 0) return E_SYSTEM;
    uint64_t id_len = data[ENVELOPE];
    if (id_len == 0 || id_len > 64 || data_len < ENVELOPE + 1 + id_len + 9) return E_RUN_ID;
    const uint8_t *run_id = data + ENVELOPE + 1;
    const uint8_t *bump = run_id + id_len;
    uint64_t lamports = load_u64(bump + 1);
    const uint8_t *payload = bump + 9;
    uint64_t payload_len = data_len - (uint64_t)(payload - data);
    uint8_t run_hash[32];
    Bytes id_part = {run_id, id_len};
    sol_sha256(&id_part, 1, run_hash);
    uint8_t tag[3];
    tag[0] = 'r'; tag[1] = 'u'; tag[2] = 'n';
    Bytes seeds[3] = {{tag, 3}, {run_hash, 32}, {bump, 1}};
    uint8_t derived[32];
    if (sol_create_program_address(seeds, 3, program_id, derived) != 0 || !eq32(derived, A_KEY(acc[1])))
        return E_BAD_ADDRESS;

    if (create_account(acc, lamports, program_id, seeds) != 0) return E_CREATE;

    uint8_t *run = A_DATA(acc[1]);
    store_u64(run, RUN_MAGIC);
    copy(run + 8, run_hash, 32);
    copy(run + 40, A_KEY(acc[0]), 32);
    store_u64(run + 72, 0);
    for (int i = 0; i < 32; i++) run[80 + i] = 0;
    record(run, A_KEY(acc[0]), payload, payload_len);
    return 0;
}

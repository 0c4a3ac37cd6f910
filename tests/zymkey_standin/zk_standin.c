/*
 * A software stand-in for Zymbit's libzk_app_utils.so, for tests only (the product never ships it).
 *
 * Why: the Zymkey backend of trustcap must run through the real `zymkey` Python module (package zku) in
 * CI, where no Zymkey is plugged in. This library exports every symbol that module binds with ctypes,
 * implements the calls trustcap uses with OpenSSL's libcrypto, and fails every other call clearly
 * (a line on stderr and -EOPNOTSUPP).
 *
 * State lives in the directory named by ZYMKEY_STANDIN_STATE (created on first zkOpen):
 *   serial          the module's serial number string
 *   onewaykey       32 bytes: the AES-256-GCM key behind zkLockData / zkUnlockData ("one-way key")
 *   slot<N>         1 byte curve (0 = NIST P-256, 1 = secp256k1) + 32-byte big-endian private scalar;
 *                   slot 0 is a P-256 key as on a real module, zkGenKeyPair adds slots from 16 upwards
 *   perimeter       optional: two decimal timestamps, the first breach seen on channels 0 and 1
 *   fail            optional: "open" makes zkOpen fail (no device), "timeout" makes every call time out
 *
 * Conventions copied from the real library as the Python module uses them: outputs are malloc'ed and
 * handed over (the module never frees them); negative returns are errors; unlock and verify return 1
 * for good and 0 for bad; signatures are r||s (64 bytes); public keys are X||Y (64 bytes).
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/rand.h>

#define MAX_SLOTS 64
#define FIRST_GEN_SLOT 16
#define LOCK_MAGIC "ZSL1"

typedef struct {
    char dir[4096];
} zk_ctx;

/* ---------- helpers ---------- */

static int path_of(const zk_ctx *c, const char *name, char *out, size_t n) {
    int w = snprintf(out, n, "%s/%s", c->dir, name);
    return (w < 0 || (size_t)w >= n) ? -ENAMETOOLONG : 0;
}

static int read_file(const zk_ctx *c, const char *name, uint8_t *buf, size_t cap, size_t *len) {
    char p[4200];
    if (path_of(c, name, p, sizeof p)) return -ENAMETOOLONG;
    FILE *f = fopen(p, "rb");
    if (!f) return -ENOENT;
    *len = fread(buf, 1, cap, f);
    fclose(f);
    return 0;
}

static int write_file(const zk_ctx *c, const char *name, const uint8_t *buf, size_t len) {
    char p[4200];
    if (path_of(c, name, p, sizeof p)) return -ENAMETOOLONG;
    FILE *f = fopen(p, "wb");
    if (!f) return -EIO;
    size_t w = fwrite(buf, 1, len, f);
    fclose(f);
    chmod(p, 0600);
    return w == len ? 0 : -EIO;
}

static bool fail_mode(const char *dir, const char *what) {
    char p[4200], buf[64] = {0};
    snprintf(p, sizeof p, "%s/fail", dir);
    FILE *f = fopen(p, "rb");
    if (!f) return false;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    return strstr(buf, what) != NULL;
}

#define CHECK_CTX(ctx)                                          \
    do {                                                        \
        if (!(ctx)) return -EINVAL;                             \
        if (fail_mode(((zk_ctx *)(ctx))->dir, "timeout")) return -ETIMEDOUT; \
    } while (0)

static void *dup_out(const void *src, size_t n) {
    void *p = malloc(n ? n : 1);
    if (p && n) memcpy(p, src, n);
    return p;
}

static int curve_nid(uint8_t curve) {
    return curve == 0 ? NID_X9_62_prime256v1 : curve == 1 ? NID_secp256k1 : NID_undef;
}

/* Load slot N: its group, private scalar and public point. */
static int load_slot(const zk_ctx *c, int slot, EC_GROUP **g, BIGNUM **d, EC_POINT **q) {
    if (slot < 0 || slot >= MAX_SLOTS) return -EINVAL;
    char name[32];
    uint8_t buf[64];
    size_t len = 0;
    snprintf(name, sizeof name, "slot%d", slot);
    if (read_file(c, name, buf, sizeof buf, &len) || len != 33) return -ENOENT;
    int nid = curve_nid(buf[0]);
    if (nid == NID_undef) return -EINVAL;
    *g = EC_GROUP_new_by_curve_name(nid);
    *d = BN_bin2bn(buf + 1, 32, NULL);
    *q = EC_POINT_new(*g);
    if (!*g || !*d || !*q || !EC_POINT_mul(*g, *q, *d, NULL, NULL, NULL)) return -EIO;
    return 0;
}

static void free_slot(EC_GROUP *g, BIGNUM *d, EC_POINT *q) {
    EC_POINT_free(q);
    BN_clear_free(d);
    EC_GROUP_free(g);
}

static int new_key(const zk_ctx *c, int slot, uint8_t curve) {
    int nid = curve_nid(curve);
    if (nid == NID_undef) return -EINVAL;
    EC_GROUP *g = EC_GROUP_new_by_curve_name(nid);
    BIGNUM *d = BN_new();
    int rc = -EIO;
    uint8_t buf[33];
    if (g && d && BN_rand_range(d, EC_GROUP_get0_order(g)) && !BN_is_zero(d)) {
        buf[0] = curve;
        if (BN_bn2binpad(d, buf + 1, 32) == 32) {
            char name[32];
            snprintf(name, sizeof name, "slot%d", slot);
            rc = write_file(c, name, buf, sizeof buf);
        }
    }
    OPENSSL_cleanse(buf, sizeof buf);
    BN_clear_free(d);
    EC_GROUP_free(g);
    return rc;
}

static bool slot_exists(const zk_ctx *c, int slot) {
    char name[32], p[4200];
    struct stat st;
    snprintf(name, sizeof name, "slot%d", slot);
    return path_of(c, name, p, sizeof p) == 0 && stat(p, &st) == 0;
}

/* ---------- context ---------- */

int zkOpen(void **ctx) {
    const char *dir = getenv("ZYMKEY_STANDIN_STATE");
    if (!ctx || !dir || !*dir) return -ENODEV; /* no device: as when zkifc or the module is absent */
    if (fail_mode(dir, "open")) return -ENODEV;
    mkdir(dir, 0700);
    zk_ctx *c = calloc(1, sizeof *c);
    if (!c) return -ENOMEM;
    snprintf(c->dir, sizeof c->dir, "%s", dir);
    uint8_t buf[64];
    size_t len;
    if (read_file(c, "onewaykey", buf, sizeof buf, &len)) {
        RAND_bytes(buf, 32);
        write_file(c, "onewaykey", buf, 32);
    }
    if (read_file(c, "serial", buf, sizeof buf, &len)) {
        uint8_t r[6];
        char s[32];
        RAND_bytes(r, sizeof r);
        int n = snprintf(s, sizeof s, "ZSTANDIN-%02X%02X%02X%02X%02X%02X", r[0], r[1], r[2], r[3], r[4], r[5]);
        write_file(c, "serial", (uint8_t *)s, (size_t)n);
    }
    if (!slot_exists(c, 0)) new_key(c, 0, 0);
    OPENSSL_cleanse(buf, sizeof buf);
    *ctx = c;
    return 0;
}

int zkClose(void *ctx) {
    free(ctx);
    return 0;
}

/* ---------- random ---------- */

int zkGetRandBytes(void *ctx, void **out, int n) {
    CHECK_CTX(ctx);
    if (n < 0 || !out) return -EINVAL;
    uint8_t *p = malloc(n ? (size_t)n : 1);
    if (!p || RAND_bytes(p, n) != 1) return -EIO;
    *out = p;
    return 0;
}

/* ---------- lock / unlock (one-way key, AES-256-GCM) ---------- */

static int gcm(const zk_ctx *c, bool enc, const uint8_t *in, int in_len, void **out, int *out_len) {
    uint8_t key[64];
    size_t klen = 0;
    if (read_file(c, "onewaykey", key, sizeof key, &klen) || klen != 32) return -EIO;
    int rc = -EIO, len = 0, fin = 0;
    EVP_CIPHER_CTX *e = EVP_CIPHER_CTX_new();
    const int hdr = 4 + 12;
    if (enc) {
        uint8_t *o = malloc((size_t)in_len + hdr + 16);
        if (!o) goto done;
        memcpy(o, LOCK_MAGIC, 4);
        RAND_bytes(o + 4, 12);
        if (EVP_EncryptInit_ex(e, EVP_aes_256_gcm(), NULL, key, o + 4) == 1 &&
            EVP_EncryptUpdate(e, NULL, &len, o, 4) == 1 &&
            EVP_EncryptUpdate(e, o + hdr, &len, in, in_len) == 1 &&
            EVP_EncryptFinal_ex(e, o + hdr + len, &fin) == 1 &&
            EVP_CIPHER_CTX_ctrl(e, EVP_CTRL_GCM_GET_TAG, 16, o + hdr + in_len) == 1) {
            *out = o;
            *out_len = in_len + hdr + 16;
            rc = 0;
        } else {
            free(o);
        }
    } else {
        if (in_len < hdr + 16 || memcmp(in, LOCK_MAGIC, 4) != 0) { rc = 0; goto done; } /* not ours: bad */
        int ct_len = in_len - hdr - 16;
        uint8_t *o = malloc((size_t)ct_len + 1);
        if (!o) goto done;
        if (EVP_DecryptInit_ex(e, EVP_aes_256_gcm(), NULL, key, in + 4) == 1 &&
            EVP_DecryptUpdate(e, NULL, &len, in, 4) == 1 &&
            EVP_DecryptUpdate(e, o, &len, in + hdr, ct_len) == 1 &&
            EVP_CIPHER_CTX_ctrl(e, EVP_CTRL_GCM_SET_TAG, 16, (void *)(in + hdr + ct_len)) == 1 &&
            EVP_DecryptFinal_ex(e, o + len, &fin) == 1) {
            *out = o;
            *out_len = ct_len;
            rc = 1;
        } else {
            OPENSSL_cleanse(o, (size_t)ct_len);
            free(o);
            rc = 0; /* authentication failed */
        }
    }
done:
    OPENSSL_cleanse(key, sizeof key);
    EVP_CIPHER_CTX_free(e);
    return rc;
}

int zkLockDataB2B(void *ctx, const uint8_t *in, int in_len, void **out, int *out_len, bool use_shared_key) {
    CHECK_CTX(ctx);
    if (use_shared_key) {
        fprintf(stderr, "zymkey stand-in: the shared (cloud) key is not implemented\n");
        return -EOPNOTSUPP;
    }
    if (in_len < 0 || !out || !out_len) return -EINVAL;
    return gcm(ctx, true, in, in_len, out, out_len);
}

int zkUnlockDataB2B(void *ctx, const uint8_t *in, int in_len, void **out, int *out_len, bool use_shared_key) {
    CHECK_CTX(ctx);
    if (use_shared_key) {
        fprintf(stderr, "zymkey stand-in: the shared (cloud) key is not implemented\n");
        return -EOPNOTSUPP;
    }
    if (in_len < 0 || !out || !out_len) return -EINVAL;
    return gcm(ctx, false, in, in_len, out, out_len);
}

/* ---------- keys ---------- */

static int export_pub(const zk_ctx *c, int slot, void **out, int *out_len) {
    EC_GROUP *g = NULL;
    BIGNUM *d = NULL;
    EC_POINT *q = NULL;
    int rc = load_slot(c, slot, &g, &d, &q);
    if (rc == 0) {
        uint8_t buf[65];
        if (EC_POINT_point2oct(g, q, POINT_CONVERSION_UNCOMPRESSED, buf, sizeof buf, NULL) == 65) {
            *out = dup_out(buf + 1, 64);
            *out_len = 64;
        } else {
            rc = -EIO;
        }
    }
    free_slot(g, d, q);
    return rc;
}

int zkExportPubKey(void *ctx, void **out, int *out_len, int slot, bool foreign) {
    CHECK_CTX(ctx);
    if (foreign) return -EOPNOTSUPP;
    return export_pub(ctx, slot, out, out_len);
}

int zkGetECDSAPubKey(void *ctx, void **out, int *out_len, int slot) {
    CHECK_CTX(ctx);
    return export_pub(ctx, slot, out, out_len);
}

int zkGenKeyPair(void *ctx, int key_type) {
    CHECK_CTX(ctx);
    if (key_type != 0 && key_type != 1) {
        fprintf(stderr, "zymkey stand-in: key type %d is not implemented (only nistp256, secp256k1)\n", key_type);
        return -EOPNOTSUPP;
    }
    for (int s = FIRST_GEN_SLOT; s < MAX_SLOTS; s++) {
        if (!slot_exists(ctx, s)) {
            int rc = new_key(ctx, s, (uint8_t)key_type);
            return rc < 0 ? rc : s;
        }
    }
    return -ENOSPC;
}

int zkGetAllocSlotsList(void *ctx, bool foreign, int *max_num_keys, void **list, int *list_len) {
    CHECK_CTX(ctx);
    if (foreign) return -EOPNOTSUPP;
    int slots[MAX_SLOTS], n = 0;
    for (int s = 0; s < MAX_SLOTS; s++)
        if (slot_exists(ctx, s)) slots[n++] = s;
    *max_num_keys = MAX_SLOTS;
    *list = dup_out(slots, sizeof(int) * (size_t)n);
    *list_len = n;
    return 0;
}

/* ---------- ECDSA on a digest, by hand so that the recovery id (R.y parity) is known ---------- */

int zkGenECDSASigFromDigestWithRecID(void *ctx, const uint8_t *digest, int slot, void **sig, int *sig_len,
                                     unsigned int *recid) {
    CHECK_CTX(ctx);
    EC_GROUP *g = NULL;
    BIGNUM *d = NULL;
    EC_POINT *q = NULL;
    int rc = load_slot(ctx, slot, &g, &d, &q);
    if (rc) { free_slot(g, d, q); return rc; }
    const BIGNUM *n = EC_GROUP_get0_order(g);
    BN_CTX *bc = BN_CTX_new();
    BIGNUM *k = BN_new(), *r = BN_new(), *s = BN_new(), *z = BN_bin2bn(digest, 32, NULL), *x = BN_new(),
           *y = BN_new(), *t = BN_new();
    EC_POINT *R = EC_POINT_new(g);
    rc = -EIO;
    for (int tries = 0; tries < 16; tries++) {
        if (!BN_rand_range(k, n) || BN_is_zero(k)) continue;
        if (!EC_POINT_mul(g, R, k, NULL, NULL, bc) || !EC_POINT_get_affine_coordinates(g, R, x, y, bc)) break;
        if (!BN_nnmod(r, x, n, bc) || BN_is_zero(r)) continue;
        /* s = k^-1 (z + r d) mod n */
        if (!BN_mod_mul(t, r, d, n, bc) || !BN_mod_add(t, t, z, n, bc) || !BN_mod_inverse(k, k, n, bc) ||
            !BN_mod_mul(s, k, t, n, bc) || BN_is_zero(s))
            continue;
        uint8_t out[64];
        BN_bn2binpad(r, out, 32);
        BN_bn2binpad(s, out + 32, 32);
        *sig = dup_out(out, 64);
        *sig_len = 64;
        if (recid) *recid = (unsigned int)(BN_is_odd(y) ? 1 : 0) | (BN_cmp(x, n) >= 0 ? 2 : 0);
        rc = 0;
        break;
    }
    EC_POINT_free(R);
    BN_clear_free(k);
    BN_free(r); BN_free(s); BN_free(z); BN_free(x); BN_free(y); BN_clear_free(t);
    BN_CTX_free(bc);
    free_slot(g, d, q);
    return rc;
}

int zkGenECDSASigFromDigest(void *ctx, const uint8_t *digest, int slot, void **sig, int *sig_len) {
    return zkGenECDSASigFromDigestWithRecID(ctx, digest, slot, sig, sig_len, NULL);
}

int zkVerifyECDSASigFromDigest(void *ctx, const uint8_t *digest, int slot, const uint8_t *sig, int sig_len) {
    CHECK_CTX(ctx);
    if (sig_len != 64) return 0;
    EC_GROUP *g = NULL;
    BIGNUM *d = NULL;
    EC_POINT *q = NULL;
    int rc = load_slot(ctx, slot, &g, &d, &q);
    if (rc) { free_slot(g, d, q); return rc; }
    const BIGNUM *n = EC_GROUP_get0_order(g);
    BN_CTX *bc = BN_CTX_new();
    BIGNUM *r = BN_bin2bn(sig, 32, NULL), *s = BN_bin2bn(sig + 32, 32, NULL), *z = BN_bin2bn(digest, 32, NULL),
           *w = BN_new(), *u1 = BN_new(), *u2 = BN_new(), *x = BN_new();
    EC_POINT *X = EC_POINT_new(g);
    rc = 0;
    if (!BN_is_zero(r) && !BN_is_zero(s) && BN_cmp(r, n) < 0 && BN_cmp(s, n) < 0 &&
        BN_mod_inverse(w, s, n, bc) && BN_mod_mul(u1, z, w, n, bc) && BN_mod_mul(u2, r, w, n, bc) &&
        EC_POINT_mul(g, X, u1, q, u2, bc) && !EC_POINT_is_at_infinity(g, X) &&
        EC_POINT_get_affine_coordinates(g, X, x, NULL, bc) && BN_nnmod(x, x, n, bc) && BN_cmp(x, r) == 0)
        rc = 1;
    EC_POINT_free(X);
    BN_free(r); BN_free(s); BN_free(z); BN_free(w); BN_free(u1); BN_free(u2); BN_free(x);
    BN_CTX_free(bc);
    free_slot(g, d, q);
    return rc;
}

/* ---------- module info and perimeter ---------- */

static int string_out(const char *s, void **out) {
    *out = dup_out(s, strlen(s) + 1);
    return *out ? 0 : -ENOMEM;
}

int zkGetSerialNumberString(void *ctx, void **out) {
    CHECK_CTX(ctx);
    char buf[64] = {0};
    size_t len = 0;
    if (read_file(ctx, "serial", (uint8_t *)buf, sizeof buf - 1, &len)) return -EIO;
    buf[len] = 0;
    return string_out(buf, out);
}

int zkGetModelNumberString(void *ctx, void **out) {
    CHECK_CTX(ctx);
    return string_out("ZYMKEY-STANDIN", out);
}

int zkGetFirmwareVersionString(void *ctx, void **out) {
    CHECK_CTX(ctx);
    return string_out("standin-1", out);
}

int zkGetPerimeterDetectInfo(void *ctx, void **out, int *out_len) {
    CHECK_CTX(ctx);
    uint32_t ts[2] = {0, 0};
    char buf[64] = {0};
    size_t len = 0;
    if (read_file(ctx, "perimeter", (uint8_t *)buf, sizeof buf - 1, &len) == 0) {
        unsigned long a = 0, b = 0;
        buf[len] = 0;
        sscanf(buf, "%lu %lu", &a, &b);
        ts[0] = (uint32_t)a;
        ts[1] = (uint32_t)b;
    }
    *out = dup_out(ts, sizeof ts);
    *out_len = 2;
    return 0;
}

int zkClearPerimeterDetectEvents(void *ctx) {
    CHECK_CTX(ctx);
    char p[4200];
    if (path_of(ctx, "perimeter", p, sizeof p)) return -ENAMETOOLONG;
    remove(p);
    return 0;
}

/* ---------- everything else: bound by the module, not used by trustcap, failing clearly ---------- */

#define UNIMPLEMENTED(name)                                                            \
    int name(void) {                                                                   \
        fprintf(stderr, "zymkey stand-in: %s is not implemented\n", #name);           \
        return -EOPNOTSUPP;                                                            \
    }

UNIMPLEMENTED(zkLEDOn)
UNIMPLEMENTED(zkLEDOff)
UNIMPLEMENTED(zkLEDFlash)
UNIMPLEMENTED(zkCreateRandDataFile)
UNIMPLEMENTED(zkLockDataF2F)
UNIMPLEMENTED(zkLockDataB2F)
UNIMPLEMENTED(zkLockDataF2B)
UNIMPLEMENTED(zkUnlockDataF2F)
UNIMPLEMENTED(zkUnlockDataB2F)
UNIMPLEMENTED(zkUnlockDataF2B)
UNIMPLEMENTED(zkVerifyECDSASigFromDigestWithForeignKeySlot)
UNIMPLEMENTED(zkStoreForeignPubKey)
UNIMPLEMENTED(zkDisablePubKeyExport)
UNIMPLEMENTED(zkGenEphemeralKeyPair)
UNIMPLEMENTED(zkRemoveKey)
UNIMPLEMENTED(zkInvalidateEphemeralKey)
UNIMPLEMENTED(zkDoRawECDH)
UNIMPLEMENTED(zkDoRawECDHWithIntPeerPubkey)
UNIMPLEMENTED(zkDoECDHAndKDF)
UNIMPLEMENTED(zkDoECDHAndKDFWithIntPeerPubkey)
UNIMPLEMENTED(zkGenWalletMasterSeedWithBIP39)
UNIMPLEMENTED(zkGenWalletMasterSeedWithSLIP39)
UNIMPLEMENTED(zkSetSLIP39GroupInfo)
UNIMPLEMENTED(zkAddSLIP39MemberPassword)
UNIMPLEMENTED(zkCancelSLIP39Session)
UNIMPLEMENTED(zkGenOversightWallet)
UNIMPLEMENTED(zkRestoreWalletMasterSeedFromBIP39Mnemonic)
UNIMPLEMENTED(zkAddRestoreSLIP39Mnemonic)
UNIMPLEMENTED(zkRestoreWalletMasterSeedFromSLIP39)
UNIMPLEMENTED(zkGenWalletChildKey)
UNIMPLEMENTED(zkGetWalletNodeAddrFromKeySlot)
UNIMPLEMENTED(zkGetWalletKeySlotFromNodeAddr)
UNIMPLEMENTED(zkExportPubKey2File)
UNIMPLEMENTED(zkLockBinding)
UNIMPLEMENTED(zkGetCurrentBindingInfo)
UNIMPLEMENTED(zkGetCPUTemp)
UNIMPLEMENTED(zkGetAUXTemp)
UNIMPLEMENTED(zkGetRTCDrift)
UNIMPLEMENTED(zkGetBatteryVoltage)
UNIMPLEMENTED(zkSetDigitalPerimeterDetectLPPeriod)
UNIMPLEMENTED(zkSetDigitalPerimeterDetectLPMaxBits)
UNIMPLEMENTED(zkSetDigitalPerimeterDetectDelays)
UNIMPLEMENTED(zkSetBatteryVoltageAction)
UNIMPLEMENTED(zkSetBatteryVoltageThreshold)
UNIMPLEMENTED(zkSetCPUTempAction)
UNIMPLEMENTED(zkSetCPULowTempThreshold)
UNIMPLEMENTED(zkSetCPUHighTempThreshold)
UNIMPLEMENTED(zkSetSupervisedBootPolicy)
UNIMPLEMENTED(zkAddOrUpdateSupervisedBootFile)
UNIMPLEMENTED(zkRemoveSupervisedBootFile)
UNIMPLEMENTED(zkGetSupervisedBootFileManifest)
UNIMPLEMENTED(zkSaveECDSAPubKey2File)
UNIMPLEMENTED(zkSetI2CAddr)
UNIMPLEMENTED(zkSetTapSensitivity)
UNIMPLEMENTED(zkGetTime)
UNIMPLEMENTED(zkWaitForTap)
UNIMPLEMENTED(zkGetAccelerometerData)
UNIMPLEMENTED(zkWaitForPerimeterEvent)
UNIMPLEMENTED(zkSetPerimeterEventAction)

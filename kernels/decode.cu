// decode.cu - NDJSON records straight into typed columns (the native decoder's fast path).
//
// One iteration per record.  A record is ACCEPTED only when this kernel can decide it with
// certainty under the validation contract (docs/semantics.md, section 1) and produce exactly
// the values the exact validator would: a flat JSON object whose keys are the known fields,
// each at most once, with ASCII strings without escapes, non-negative JSON numbers, and every
// field rule satisfied.  Other fields (ignored by the contract) are accepted when their value
// is a plain scalar (an ASCII string without escapes, a JSON number, true, false, null), since
// such a value can hold nothing the contract rejects; up to DEC_MAX_EXTRA of them, all keys
// distinct.  Everything else - an escape, a non-ASCII byte, a nested value, a repeated key,
// a negative or long number in a field, any rule that fails - is left UNDECIDED (ok = 0) for
// the exact path, which therefore still decides every dead letter and its message.
//
// Outputs per record i (meaningful when ok[i] = 1):
//   nums[4i..4i+3]  user_id, ts (epoch ms), product_id, quantity (1 when absent)
//   price[i]        unit price (when has[i] & HAS_PRICE)
//   spans[10i..]    (start, length) in buf of event_id, page, category, country, referrer;
//                   length -1 when the field is absent or null
//   codes[2i..]     event_type index (schema.EVENT_TYPES), device index (-1: absent)
//   has[i]          HAS_PRODUCT | HAS_PRICE
//
// Numbers: integers of up to 19 digits below 2^63; a price with a fraction or exponent only
// when its significant digits fit 15 and its decimal exponent is within 22, where one IEEE
// multiplication or division of two exact doubles is the correctly rounded value (Clinger's
// fast path), so the result is bit-identical to the validator's float().
#include "portable.cuh"

#define DEC_HAS_PRODUCT 1
#define DEC_HAS_PRICE 2

#define DEC_NULL 0
#define DEC_STRING 1
#define DEC_INT 2
#define DEC_FLOAT 3
#define DEC_BAD 4

#define DEC_NFIELDS 12
#define DEC_MAX_EXTRA 8
#define DEC_MAX_TEXT 4096
#define DEC_MAX_EVENT_ID 64
#define DEC_MAX_TS_MS 10413791999999LL

// Field numbers: the order of gpu_pipeline.decode.validate.FIELD_ORDER.
#define F_EVENT_ID 0
#define F_USER_ID 1
#define F_TS 2
#define F_EVENT_TYPE 3
#define F_PAGE 4
#define F_PRODUCT_ID 5
#define F_CATEGORY 6
#define F_PRICE 7
#define F_QUANTITY 8
#define F_COUNTRY 9
#define F_DEVICE 10
#define F_REFERRER 11

struct DecValue {
    i32 kind;
    i64 start;
    i64 len;
    i64 ival;
    f64 fval;
};

DEVICE bool dec_ws(u8 c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
DEVICE bool dec_digit(u8 c) { return c >= '0' && c <= '9'; }

DEVICE bool dec_is(const u8* p, i64 len, const char* word) {
    i64 k = 0;
    for (; word[k] != 0; ++k) {
        if (k >= len || p[k] != (u8)word[k]) return false;
    }
    return k == len;
}

// The field number of a key, or -1 for any other key.
DEVICE i32 dec_field(const u8* p, i64 len) {
    switch (len) {
        case 2: return dec_is(p, len, "ts") ? F_TS : -1;
        case 4: return dec_is(p, len, "page") ? F_PAGE : -1;
        case 5: return dec_is(p, len, "price") ? F_PRICE : -1;
        case 6: return dec_is(p, len, "device") ? F_DEVICE : -1;
        case 7:
            if (dec_is(p, len, "user_id")) return F_USER_ID;
            return dec_is(p, len, "country") ? F_COUNTRY : -1;
        case 8:
            if (dec_is(p, len, "event_id")) return F_EVENT_ID;
            if (dec_is(p, len, "category")) return F_CATEGORY;
            if (dec_is(p, len, "quantity")) return F_QUANTITY;
            return dec_is(p, len, "referrer") ? F_REFERRER : -1;
        case 10:
            if (dec_is(p, len, "event_type")) return F_EVENT_TYPE;
            return dec_is(p, len, "product_id") ? F_PRODUCT_ID : -1;
        default: return -1;
    }
}

DEVICE i32 dec_event_type(const u8* p, i64 len) {
    if (dec_is(p, len, "page_view")) return 0;
    if (dec_is(p, len, "product_view")) return 1;
    if (dec_is(p, len, "search")) return 2;
    if (dec_is(p, len, "add_to_cart")) return 3;
    if (dec_is(p, len, "remove_from_cart")) return 4;
    if (dec_is(p, len, "checkout")) return 5;
    if (dec_is(p, len, "purchase")) return 6;
    return -1;
}

DEVICE i32 dec_device(const u8* p, i64 len) {
    if (dec_is(p, len, "desktop")) return 0;
    if (dec_is(p, len, "mobile")) return 1;
    if (dec_is(p, len, "tablet")) return 2;
    return -1;
}

// A string from the byte after its opening quote: ASCII without escapes or control bytes.
// Returns the position after the closing quote, or -1 (undecided).
DEVICE i64 dec_string(const u8* buf, i64 at, i64 end, DecValue* v) {
    i64 k = at;
    while (k < end) {
        u8 c = buf[k];
        if (c == '"') {
            v->kind = DEC_STRING;
            v->start = at;
            v->len = k - at;
            return k + 1;
        }
        if (c == '\\' || c < 0x20 || c >= 0x80) return -1;
        ++k;
    }
    return -1;
}

DEVICE f64 dec_pow10(i32 e) {
    f64 r = 1.0;
    for (i32 k = 0; k < e; ++k) r *= 10.0;  // exact up to 1e22
    return r;
}

// A JSON number (non-negative), as an integer below 2^63 or a fast-path double.
DEVICE i64 dec_number(const u8* buf, i64 at, i64 end, DecValue* v) {
    i64 k = at;
    if (k >= end || !dec_digit(buf[k])) return -1;  // '-' and anything else: undecided
    u64 mantissa = 0;
    i32 digits = 0;       // significant digits in mantissa
    i32 int_digits = 0;   // digits before the point
    bool exact = true;    // mantissa holds every significant digit
    if (buf[k] == '0') {
        ++k;
        int_digits = 1;
        if (k < end && dec_digit(buf[k])) return -1;  // leading zero: invalid JSON
    } else {
        while (k < end && dec_digit(buf[k])) {
            if (digits < 19) {
                mantissa = mantissa * 10 + (u64)(buf[k] - '0');
                ++digits;
            } else {
                exact = false;
            }
            ++int_digits;
            ++k;
        }
    }
    i32 frac_digits = 0;
    bool is_float = false;
    if (k < end && buf[k] == '.') {
        is_float = true;
        ++k;
        if (k >= end || !dec_digit(buf[k])) return -1;
        while (k < end && dec_digit(buf[k])) {
            if (mantissa == 0 && buf[k] == '0') {
                ++frac_digits;  // leading zeros of the fraction are not significant
            } else if (digits < 19) {
                mantissa = mantissa * 10 + (u64)(buf[k] - '0');
                ++digits;
                ++frac_digits;
            } else {
                exact = false;
            }
            ++k;
        }
    }
    i32 exponent = 0;
    if (k < end && (buf[k] == 'e' || buf[k] == 'E')) {
        is_float = true;
        ++k;
        bool negative = false;
        if (k < end && (buf[k] == '+' || buf[k] == '-')) {
            negative = buf[k] == '-';
            ++k;
        }
        if (k >= end || !dec_digit(buf[k])) return -1;
        i32 exp_digits = 0;
        while (k < end && dec_digit(buf[k])) {
            if (++exp_digits > 4) return -1;
            exponent = exponent * 10 + (i32)(buf[k] - '0');
            ++k;
        }
        if (negative) exponent = -exponent;
    }
    if (!exact) return -1;
    if (!is_float) {
        if (int_digits > 19) return -1;
        if (mantissa > 9223372036854775807ULL) return -1;
        v->kind = DEC_INT;
        v->ival = (i64)mantissa;
        v->fval = (f64)mantissa;
        return k;
    }
    if (digits > 15) return -1;
    i32 e10 = exponent - frac_digits;
    f64 m = (f64)mantissa;  // exact: below 10^15 < 2^53
    if (mantissa == 0) {
        v->fval = 0.0;
    } else if (e10 >= 0 && e10 <= 22) {
        v->fval = m * dec_pow10(e10);
    } else if (e10 < 0 && e10 >= -22) {
        v->fval = m / dec_pow10(-e10);
    } else {
        return -1;
    }
    v->kind = DEC_FLOAT;
    return k;
}

// Any JSON number (the grammar of RFC 8259), for a field the contract ignores.
DEVICE i64 dec_skip_number(const u8* buf, i64 at, i64 end) {
    i64 k = at;
    if (k < end && buf[k] == '-') ++k;
    if (k >= end || !dec_digit(buf[k])) return -1;
    if (buf[k] == '0') {
        ++k;
    } else {
        while (k < end && dec_digit(buf[k])) ++k;
    }
    if (k < end && buf[k] == '.') {
        ++k;
        if (k >= end || !dec_digit(buf[k])) return -1;
        while (k < end && dec_digit(buf[k])) ++k;
    }
    if (k < end && (buf[k] == 'e' || buf[k] == 'E')) {
        ++k;
        if (k < end && (buf[k] == '+' || buf[k] == '-')) ++k;
        if (k >= end || !dec_digit(buf[k])) return -1;
        while (k < end && dec_digit(buf[k])) ++k;
    }
    return k;
}

DEVICE i64 dec_literal(const u8* buf, i64 at, i64 end, const char* word) {
    i64 k = 0;
    for (; word[k] != 0; ++k) {
        if (at + k >= end || buf[at + k] != (u8)word[k]) return -1;
    }
    return at + k;
}

// The value of a field the contract ignores: a plain scalar, else undecided (-1).
DEVICE i64 dec_skip_scalar(const u8* buf, i64 at, i64 end) {
    if (at >= end) return -1;
    u8 c = buf[at];
    if (c == '"') {
        DecValue ignored;
        return dec_string(buf, at + 1, end, &ignored);
    }
    if (c == 't') return dec_literal(buf, at, end, "true");
    if (c == 'f') return dec_literal(buf, at, end, "false");
    if (c == 'n') return dec_literal(buf, at, end, "null");
    return dec_skip_number(buf, at, end);
}

// One value from its first byte; the position after it, or -1 (undecided).
DEVICE i64 dec_value(const u8* buf, i64 at, i64 end, DecValue* v) {
    if (at >= end) return -1;
    u8 c = buf[at];
    if (c == '"') return dec_string(buf, at + 1, end, v);
    if (c == 'n') {
        if (at + 4 <= end && buf[at + 1] == 'u' && buf[at + 2] == 'l' && buf[at + 3] == 'l') {
            v->kind = DEC_NULL;
            return at + 4;
        }
        return -1;
    }
    return dec_number(buf, at, end, v);
}

DEVICE i64 dec_two(const u8* p) {
    if (!dec_digit(p[0]) || !dec_digit(p[1])) return -1;
    return (i64)(p[0] - '0') * 10 + (i64)(p[1] - '0');
}

DEVICE i64 dec_days_from_civil(i64 y, i64 m, i64 d) {
    y -= m <= 2 ? 1 : 0;
    i64 era = (y >= 0 ? y : y - 399) / 400;
    i64 yoe = y - era * 400;
    i64 doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    i64 doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

// YYYY-MM-DDTHH:MM:SS[.f{1,3}]Z as epoch ms, or -1 when it is not exactly that form or
// not a real calendar time (Python's datetime rejects it then too).
DEVICE i64 dec_ts_string(const u8* p, i64 len) {
    if (len != 20 && (len < 22 || len > 24)) return -1;
    if (p[4] != '-' || p[7] != '-' || p[10] != 'T' || p[13] != ':' || p[16] != ':') return -1;
    if (p[len - 1] != 'Z') return -1;
    i64 hi = dec_two(p), lo = dec_two(p + 2);
    i64 month = dec_two(p + 5), day = dec_two(p + 8);
    i64 hour = dec_two(p + 11), minute = dec_two(p + 14), second = dec_two(p + 17);
    if (hi < 0 || lo < 0 || month < 0 || day < 0 || hour < 0 || minute < 0 || second < 0) {
        return -1;
    }
    i64 year = hi * 100 + lo;
    i64 millis = 0;
    if (len > 20) {
        if (p[19] != '.') return -1;
        i64 scale = 100;
        for (i64 k = 20; k < len - 1; ++k) {
            if (!dec_digit(p[k])) return -1;
            millis += (i64)(p[k] - '0') * scale;
            scale /= 10;
        }
    }
    if (year < 1 || month < 1 || month > 12 || day < 1) return -1;
    i64 leap = (year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)) ? 1 : 0;
    i64 dim = month == 2 ? 28 + leap : ((month == 4 || month == 6 || month == 9 || month == 11) ? 30 : 31);
    if (day > dim || hour > 23 || minute > 59 || second > 59) return -1;
    i64 days = dec_days_from_civil(year, month, day);
    return ((days * 24 + hour) * 60 + minute) * 60000 + second * 1000 + millis;
}

// Parse the top-level object of record [at, end) into fields; false when undecided.
DEVICE bool dec_object(const u8* buf, i64 at, i64 end, DecValue* fields) {
    while (at < end && dec_ws(buf[at])) ++at;
    while (end > at && dec_ws(buf[end - 1])) --end;
    if (at >= end || buf[at] != '{' || buf[end - 1] != '}') return false;
    i64 k = at + 1;
    i32 seen = 0;
    i64 extra_start[DEC_MAX_EXTRA];
    i64 extra_len[DEC_MAX_EXTRA];
    i32 extras = 0;
    while (k < end && dec_ws(buf[k])) ++k;
    if (k < end && buf[k] == '}') return k == end - 1;  // {}: decided later (fields missing)
    while (k < end) {
        if (buf[k] != '"') return false;
        DecValue key;
        i64 after = dec_string(buf, k + 1, end, &key);
        if (after < 0) return false;
        i32 f = dec_field(buf + key.start, key.len);
        if (f >= 0) {
            if (seen & (1 << f)) return false;  // repeated key
            seen |= 1 << f;
        } else {
            if (extras == DEC_MAX_EXTRA) return false;
            for (i32 e = 0; e < extras; ++e) {
                if (gp_bytes_equal(buf + extra_start[e], extra_len[e], buf + key.start, key.len)) {
                    return false;  // repeated key
                }
            }
            extra_start[extras] = key.start;
            extra_len[extras] = key.len;
            ++extras;
        }
        k = after;
        while (k < end && dec_ws(buf[k])) ++k;
        if (k >= end || buf[k] != ':') return false;
        ++k;
        while (k < end && dec_ws(buf[k])) ++k;
        k = f >= 0 ? dec_value(buf, k, end, &fields[f]) : dec_skip_scalar(buf, k, end);
        if (k < 0) return false;
        while (k < end && dec_ws(buf[k])) ++k;
        if (k >= end) return false;
        if (buf[k] == '}') return k == end - 1;
        if (buf[k] != ',') return false;
        ++k;
        while (k < end && dec_ws(buf[k])) ++k;
    }
    return false;
}

DEVICE bool dec_text_ok(const DecValue* v, i64 limit) {
    return v->kind == DEC_NULL || (v->kind == DEC_STRING && v->len <= limit);
}

KERNEL void decode_records(i64 n, const u8* __restrict__ buf, const i64* __restrict__ starts,
                           const i64* __restrict__ ends, u8* __restrict__ ok,
                           i64* __restrict__ nums, f64* __restrict__ price,
                           i64* __restrict__ spans, i8* __restrict__ codes,
                           u8* __restrict__ has) {
    PARALLEL_FOR(i, n) {
        ok[i] = 0;
        DecValue fields[DEC_NFIELDS];
        for (i32 f = 0; f < DEC_NFIELDS; ++f) {
            fields[f].kind = DEC_NULL;
            fields[f].start = 0;
            fields[f].len = -1;
            fields[f].ival = 0;
            fields[f].fval = 0.0;
        }
        if (!dec_object(buf, starts[i], ends[i], fields)) continue;
        const DecValue* id = &fields[F_EVENT_ID];
        if (id->kind != DEC_STRING || id->len < 1 || id->len > DEC_MAX_EVENT_ID) continue;
        if (fields[F_USER_ID].kind != DEC_INT) continue;
        const DecValue* tsv = &fields[F_TS];
        i64 ts = -1;
        if (tsv->kind == DEC_STRING) {
            ts = dec_ts_string(buf + tsv->start, tsv->len);
        } else if (tsv->kind == DEC_INT) {
            ts = tsv->ival;
        }
        if (ts < 0 || ts > DEC_MAX_TS_MS) continue;
        const DecValue* et = &fields[F_EVENT_TYPE];
        if (et->kind != DEC_STRING) continue;
        i32 type = dec_event_type(buf + et->start, et->len);
        if (type < 0) continue;
        if (!dec_text_ok(&fields[F_PAGE], DEC_MAX_TEXT)) continue;
        const DecValue* product = &fields[F_PRODUCT_ID];
        bool needs_product = type == 1 || type == 3 || type == 4 || type == 6;
        if (product->kind != DEC_INT && !(product->kind == DEC_NULL && !needs_product)) continue;
        if (!dec_text_ok(&fields[F_CATEGORY], DEC_MAX_TEXT)) continue;
        const DecValue* pv = &fields[F_PRICE];
        bool needs_price = type == 3 || type == 6;
        bool has_price = pv->kind == DEC_INT || pv->kind == DEC_FLOAT;
        if (!has_price && !(pv->kind == DEC_NULL && !needs_price)) continue;
        if (has_price && !(pv->fval >= 0.0 && pv->fval <= 1e9)) continue;
        const DecValue* qv = &fields[F_QUANTITY];
        i64 quantity = 1;
        if (qv->kind == DEC_INT) {
            quantity = qv->ival;
            if (quantity < 1 || quantity > 1000000) continue;
            if (has_price && pv->fval * (f64)quantity > 1e12) continue;
        } else if (qv->kind != DEC_NULL) {
            continue;
        }
        const DecValue* country = &fields[F_COUNTRY];
        if (country->kind == DEC_STRING) {
            const u8* c = buf + country->start;
            if (country->len != 2 || c[0] < 'A' || c[0] > 'Z' || c[1] < 'A' || c[1] > 'Z') {
                continue;
            }
        } else if (country->kind != DEC_NULL) {
            continue;
        }
        const DecValue* dv = &fields[F_DEVICE];
        i32 device = -1;
        if (dv->kind == DEC_STRING) {
            device = dec_device(buf + dv->start, dv->len);
            if (device < 0) continue;
        } else if (dv->kind != DEC_NULL) {
            continue;
        }
        if (!dec_text_ok(&fields[F_REFERRER], DEC_MAX_TEXT)) continue;

        nums[4 * i] = fields[F_USER_ID].ival;
        nums[4 * i + 1] = ts;
        nums[4 * i + 2] = product->kind == DEC_INT ? product->ival : 0;
        nums[4 * i + 3] = quantity;
        price[i] = has_price ? pv->fval : 0.0;
        const i32 text[5] = {F_EVENT_ID, F_PAGE, F_CATEGORY, F_COUNTRY, F_REFERRER};
        for (i32 s = 0; s < 5; ++s) {
            const DecValue* v = &fields[text[s]];
            spans[10 * i + 2 * s] = v->kind == DEC_STRING ? v->start : 0;
            spans[10 * i + 2 * s + 1] = v->kind == DEC_STRING ? v->len : -1;
        }
        codes[2 * i] = (i8)type;
        codes[2 * i + 1] = (i8)device;
        has[i] = (u8)((product->kind == DEC_INT ? DEC_HAS_PRODUCT : 0) |
                      (has_price ? DEC_HAS_PRICE : 0));
        ok[i] = 1;
    }
}

// out[offsets[i] .. offsets[i] + lens[i]) = buf[starts[i] ..]: the bytes of a string column
// (rows with lens[i] <= 0 copy nothing).
KERNEL void gather_spans(i64 n, const u8* __restrict__ buf, const i64* __restrict__ starts,
                         const i64* __restrict__ lens, const i64* __restrict__ offsets,
                         u8* __restrict__ out) {
    PARALLEL_FOR(i, n) {
        i64 len = lens[i];
        const u8* src = buf + starts[i];
        u8* dst = out + offsets[i];
        for (i64 k = 0; k < len; ++k) dst[k] = src[k];
    }
}

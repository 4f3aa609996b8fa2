#!/usr/bin/env python3
"""Writes tests/vectors/phones.toml from libphonenumber's own metadata.

Usage: phone_vectors.py PhoneNumberMetadata.xml COMMIT > tests/vectors/phones.toml

For each country below, the example numbers libphonenumber publishes
(<exampleNumber> of fixedLine and mobile, national significant numbers) are
written the ways people write them: nationally with the territory's
nationalPrefix and spaces, and internationally with "+" and the country
code. The expected E.164 is "+", countryCode and the example number, as
libphonenumber defines it; Meta's form is the same digits without "+".
Nothing here comes from cleanroom's own code.
"""
import sys
import xml.etree.ElementTree as ET

COUNTRIES = (
    "US CA GB DE FR IT ES NL BE CH AT SE NO DK FI IE PT PL CZ GR HU RO "
    "JP KR CN IN AU NZ SG HK ZA NG KE EG IL TR AE SA CL RU UA TH MY ID PH VN"
).split()


def grouped(digits):
    """Spaces every three or four digits, the way numbers are printed."""
    parts, i = [], 0
    while i < len(digits):
        n = 4 if len(digits) - i in (4, 8) else 3
        parts.append(digits[i : i + n])
        i += n
    return " ".join(parts)


def main():
    path, commit = sys.argv[1], sys.argv[2]
    root = ET.parse(path).getroot()
    print("# Made by docs/vectors/phone_vectors.py from libphonenumber's")
    print(f"# resources/PhoneNumberMetadata.xml (google/libphonenumber, commit {commit}):")
    print("# each territory's exampleNumber (fixedLine, mobile), countryCode and")
    print("# nationalPrefix. Do not edit by hand: run the script.")
    print()
    for t in root.iter("territory"):
        region = t.get("id")
        if region not in COUNTRIES:
            continue
        cc = t.get("countryCode")
        prefix = t.get("nationalPrefix") or ""
        for kind in ("fixedLine", "mobile"):
            ex = t.find(f"{kind}/exampleNumber")
            if ex is None:
                continue
            number = ex.text.strip()
            print("[[number]]")
            print(f'region = "{region}"')
            print(f'kind = "{kind}"')
            print(f'national = "{prefix}{grouped(number)}"')
            print(f'international = "+{cc} {grouped(number)}"')
            print(f'e164 = "+{cc}{number}"')
            print()


main()

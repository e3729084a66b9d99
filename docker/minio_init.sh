#!/bin/sh
# One-shot set-up of the snapshot store for docker/compose.yaml (its minio-init service):
# the bucket, private, and an access key for Airflow that may use that bucket only.
# Safe to run again: what exists is kept.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${FLARE_SNAPSHOT_BUCKET:?}"
: "${FLARE_S3_ACCESS_KEY:?}" "${FLARE_S3_SECRET_KEY:?}"
MINIO_URL="${MINIO_URL:-http://minio:9000}"
POLICY=flare-snapshots

# The alias comes from the environment, so the root password is never a command argument.
export MC_HOST_store="${MINIO_URL%%://*}://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@${MINIO_URL#*://}"

mc mb --ignore-existing "store/${FLARE_SNAPSHOT_BUCKET}"
mc anonymous set none "store/${FLARE_SNAPSHOT_BUCKET}"

policy_file="$(mktemp)"
trap 'rm -f "$policy_file"' EXIT
cat > "$policy_file" <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::${FLARE_SNAPSHOT_BUCKET}"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::${FLARE_SNAPSHOT_BUCKET}/*"]}
  ]
}
EOF
mc admin policy create store "$POLICY" "$policy_file"
mc admin user add store "$FLARE_S3_ACCESS_KEY" "$FLARE_S3_SECRET_KEY"
# Attaching twice is an error, so attach only where the user lacks the policy.
case "$(mc admin user info store "$FLARE_S3_ACCESS_KEY")" in
  *"$POLICY"*) ;;
  *) mc admin policy attach store "$POLICY" --user "$FLARE_S3_ACCESS_KEY" ;;
esac
echo "snapshot bucket ${FLARE_SNAPSHOT_BUCKET} ready; access key ${FLARE_S3_ACCESS_KEY} may use it"
